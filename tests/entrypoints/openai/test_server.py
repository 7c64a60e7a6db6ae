"""The server as a whole: errors, the small endpoints, metrics, many clients, disconnects."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import httpx
import openai
import pytest

from tests.entrypoints.conftest import DEFAULT_MODEL, RemoteServer

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "Hello"}]

# (path, body: dict or raw text, status, param in the error or None)
ERROR_CASES: list[tuple[str, Any, int, str | None]] = [
    (COMPLETIONS, "{not json", 400, None),
    (COMPLETIONS, "[1, 2]", 400, None),
    (COMPLETIONS, {"model": DEFAULT_MODEL}, 400, "prompt"),
    (COMPLETIONS, {"model": "no-such-model", "prompt": "x"}, 404, "model"),
    (CHAT, {"model": "no-such-model", "messages": HELLO}, 404, "model"),
    (COMPLETIONS, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),  # strict, as OpenAI
    (COMPLETIONS, {"prompt": "x", "n": True}, 400, "n"),
    (COMPLETIONS, {"prompt": "x", "stop": 5}, 400, "stop"),
    (COMPLETIONS, {"prompt": 5}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "x", "top_p": 5}, 400, "top_p"),
    (COMPLETIONS, {"prompt": "x", "n": 0}, 400, "n"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "word " * 2100, "max_tokens": 1}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [[1, 2], []]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [10**9]}, 400, None),
    (COMPLETIONS, {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "suffix": "tail"}, 400, "suffix"),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"content": "no role"}]}, 400, "messages.0.role"),
    (CHAT, {"messages": HELLO, "response_format": {"type": "xml"}}, 400, "response_format"),
    (CHAT, {"messages": HELLO, "response_format": {"type": "json_schema",
                                                   "json_schema": {"name": "x", "schema": 7}}},
     400, "response_format"),
    (CHAT, {"messages": HELLO, "structured_outputs": {"regex": "a", "choice": ["b"]}}, 400,
     "structured_outputs"),
    (COMPLETIONS, {"prompt": "x", "structured_outputs": {"json": {"type": "nonsense"}}}, 400,
     None),
    (CHAT, {"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tools"),
    (CHAT, {"messages": HELLO, "guided_json": {"type": "object"}}, 400, "guided_json"),
    (CHAT, {"messages": HELLO, "top_logprobs": 3}, 400, "top_logprobs"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages"),
    (CHAT, {"messages": HELLO, "max_completion_tokens": -1}, 400, "max_tokens"),
    ("/v1/nothing-here", {}, 404, None),
]


@pytest.fixture(scope="module")
def server(default_server: RemoteServer) -> RemoteServer:
    return default_server


@pytest.mark.parametrize("path,body,status,param", ERROR_CASES)
def test_error_cases(server: RemoteServer, path: str, body: Any, status: int,
                     param: str | None) -> None:
    content = body if isinstance(body, str) else None
    response = httpx.post(server.url(path), content=content,
                          json=None if content else body,
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["code"] == status
    if param is not None:
        assert error["param"] == param, error


def test_client_errors_then_still_serving(server: RemoteServer) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=DEFAULT_MODEL, messages=HELLO,  # type: ignore[arg-type]
                                       max_tokens=100_000)
    with pytest.raises(openai.BadRequestError):
        next(iter(client.chat.completions.create(model=DEFAULT_MODEL, messages=HELLO,  # type: ignore[arg-type]
                                                 stream=True, temperature=-1)))
    # unknown fields are ignored (with a warning in the server log), as vLLM does
    out = client.completions.create(model=DEFAULT_MODEL, prompt="Hi", max_tokens=2,
                                    extra_body={"no_such_field": 1})
    assert out.choices[0].text
    assert httpx.get(server.url("/health")).status_code == 200


def test_small_endpoints(server: RemoteServer) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [DEFAULT_MODEL]
    assert (models.data[0].model_extra or {})["max_model_len"] == 2048
    assert server.client().models.retrieve(DEFAULT_MODEL).id == DEFAULT_MODEL
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4")
    assert httpx.get(server.url("/health")).status_code == 200
    assert httpx.get(server.url("/version")).json()["version"]
    tokens = httpx.post(server.url("/tokenize"),
                        json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"])
    assert tokens["max_model_len"] == 2048
    text = httpx.post(server.url("/detokenize"), json={"tokens": tokens["tokens"]}).json()
    assert text == {"prompt": "Hello world"}
    chat = httpx.post(server.url("/tokenize"), json={"messages": HELLO}).json()
    assert chat["count"] > tokens["count"]  # the template adds its markers
    bad = httpx.post(server.url("/detokenize"), json={"tokens": [-1]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_structured_outputs(server: RemoteServer) -> None:
    """response_format json_schema (OpenAI) and structured_outputs (vLLM) constrain the text."""
    client = server.client()
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    chat = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Is the sky blue? JSON."}],
        max_tokens=40, temperature=0, response_format={
            "type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert chat.choices[0].finish_reason == "stop"
    assert json.loads(chat.choices[0].message.content or "") in ({"answer": "yes"},
                                                                  {"answer": "no"})
    completion = client.completions.create(
        model=DEFAULT_MODEL, prompt="The sky is", max_tokens=8, temperature=1.0, n=3, seed=1,
        extra_body={"structured_outputs": {"choice": ["red", "blue"]}})
    assert {c.text for c in completion.choices} <= {"red", "blue"}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (summed over unlisted labels)."""
    total, found = 0.0, False
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{(.*)\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(2) or "") for k, v in labels.items()):
            total, found = total + float(match.group(3)), True
    assert found, f"{name} {labels} not in /metrics"
    return total


async def _chat_stream(client: openai.AsyncOpenAI, index: int, leave_early: bool) -> str:
    stream = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": f"Say a number: {index}"}],
        stream=True, max_tokens=400 if leave_early else 8, temperature=0,
        extra_body={"ignore_eos": True})
    text, finish = "", None
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        if leave_early and len(text) > 3:
            await stream.close()  # hang up mid-stream
            return "left"
    assert finish == "length"
    return text


async def _run_clients(server: RemoteServer, n: int, leavers: int) -> list[str]:
    client = server.async_client(timeout=120)
    try:
        return await asyncio.gather(*(_chat_stream(client, i, i < leavers) for i in range(n)))
    finally:
        await client.close()


def test_50_clients_10_hang_up(server: RemoteServer) -> None:
    before = httpx.get(server.url("/metrics")).text
    aborted_before = metric(before, "kvflow:request_success_total", finished_reason="abort")
    results = asyncio.run(_run_clients(server, 50, 10))
    assert results[:10] == ["left"] * 10
    assert all(len(text) > 0 and text != "left" for text in results[10:])
    text = wait_idle(server)  # the engine dropped the abandoned requests
    aborted = metric(text, "kvflow:request_success_total", finished_reason="abort")
    assert aborted - aborted_before == 10
    assert metric(text, "kvflow:request_success_total", finished_reason="length") >= 40
    assert metric(text, "kvflow:kv_cache_usage_perc") == 0
    assert metric(text, "kvflow:time_to_first_token_seconds_count") >= 50
    assert metric(text, "kvflow:inter_token_latency_seconds_count") > 0
    assert metric(text, "kvflow:e2e_request_latency_seconds_count") >= 50
    assert metric(text, "kvflow:generation_tokens_total") >= 40 * 8
    assert metric(text, "kvflow:prompt_tokens_total") > 0
    for name in ("kvflow:num_preemptions_total", "kvflow:prefix_cache_queries_total",
                 "kvflow:prefix_cache_hits_total"):
        assert metric(text, name) >= 0


def wait_idle(server: RemoteServer, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(server.url("/metrics")).text
        if (metric(text, "kvflow:num_requests_running") == 0
                and metric(text, "kvflow:num_requests_waiting") == 0):
            return text
        assert time.monotonic() < deadline, text
        time.sleep(0.2)


def test_hang_up_on_a_whole_response_aborts_it(server: RemoteServer) -> None:
    aborted = metric(wait_idle(server), "kvflow:request_success_total", finished_reason="abort")
    body = {"prompt": "Tell me a long story", "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url(COMPLETIONS), json=body, timeout=1.5)
    text = wait_idle(server)
    assert metric(text, "kvflow:request_success_total", finished_reason="abort") == aborted + 1
