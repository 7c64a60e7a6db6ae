"""LoRA adapters over the OpenAI API: `model` picks one, /v1/models lists them, runtime
load/unload, refusals while serving, per-adapter metrics. Every test ends with a leak check."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvflow.config import AsyncEngineArgs
from kvflow.entrypoints.openai.limits import ServerLimits
from kvflow.entrypoints.openai.server import RUNTIME_LORA_ENV, build_app, runtime_lora_updating
from kvflow.entrypoints.openai.serving_models import LoRAModulePath
from kvflow.lora.request import LoRARequest
from kvflow.sampling_params import SamplingParams
from tests.entrypoints.hostile import assert_error
from tests.entrypoints.lora_server import LoRAServer, make_test_adapters

PROMPT = "The quick brown fox"
HELLO = [{"role": "user", "content": "Hello"}]
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12}
# token ids in the response: the logprobs' tokens as "token_id:N"
AS_IDS: dict[str, Any] = {"ignore_eos": True, "return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def adapters(tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_test_adapters(tiny_llama_path, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def server(tiny_llama_path: Path, adapters: dict[str, Path]) -> Any:
    args = AsyncEngineArgs(model=str(tiny_llama_path), num_kv_blocks=128, max_model_len=512,
                           enable_lora=True, max_loras=1, max_lora_rank=16, max_cpu_loras=4,
                           num_threads=1, disable_log_stats=True)
    static = [LoRAModulePath("sql", str(adapters["sql"])),
              LoRAModulePath("chat", str(adapters["chat"]), "tiny-alias")]
    with LoRAServer(args, ["tiny", "tiny-alias"], static, runtime_updating=True,
                    limits=ServerLimits(max_request_body_mb=1)) as running:
        yield running


def ids_of(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


def complete(server: LoRAServer, model: str, prompt: str = PROMPT) -> list[int]:
    out = server.client().completions.create(model=model, prompt=prompt, logprobs=0,
                                             extra_body=AS_IDS, **GREEDY)
    assert out.model == model if model != "tiny-alias" else out.model == "tiny"
    assert out.choices[0].logprobs is not None
    return ids_of(out.choices[0].logprobs.tokens or [])


def direct(server: LoRAServer, ids: list[int], lora: LoRARequest | None, tag: str) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY["max_tokens"], ignore_eos=True)
    return server.generate(ids, params, lora, f"direct-{tag}-{time.monotonic_ns()}")


def prompt_ids(server: LoRAServer, **body: Any) -> list[int]:
    tokens: list[int] = server.post("/tokenize", body).json()["tokens"]
    return tokens


def test_models_lists_the_adapters(server: LoRAServer, adapters: dict[str, Path]) -> None:
    client = server.client()
    cards = {m.id: m.model_extra or {} for m in client.models.list().data}
    assert list(cards) == ["tiny", "tiny-alias", "sql", "chat"]
    assert cards["sql"]["root"] == str(adapters["sql"]) and cards["sql"]["parent"] == "tiny"
    assert cards["chat"]["root"] == str(adapters["chat"])
    assert cards["chat"]["parent"] == "tiny-alias"  # its base_model_name
    assert cards["tiny"]["parent"] is None
    assert client.models.retrieve("chat").id == "chat"
    assert server.call(server.engine.list_loras()) == {1, 2}
    server.assert_no_leaks()


def test_completions_run_the_named_adapter(server: LoRAServer, tiny_llama_path: Path,
                                           adapters: dict[str, Path]) -> None:
    from tests.lora.adapters import hf_greedy

    ids = prompt_ids(server, prompt=PROMPT)
    loras = server.ctx.models.lora_requests
    got = {model: complete(server, model) for model in ("tiny", "sql", "chat")}
    assert len({tuple(v) for v in got.values()}) == 3  # each adapter changes the answer
    assert got["tiny"] == complete(server, "tiny-alias") == direct(server, ids, None, "base")
    for name in ("sql", "chat"):
        assert got[name] == direct(server, ids, loras[name], name)
    assert got["sql"] == hf_greedy(tiny_llama_path, adapters["sql"], ids, GREEDY["max_tokens"])
    # base and adapters at once (two adapters, one slot: one waits its turn), same answers
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        mixed = {model: [pool.submit(complete, server, model) for _ in range(2)]
                 for model in ("sql", "tiny", "chat")}
        assert all(f.result(60) == got[model] for model, fs in mixed.items() for f in fs)
    # streamed, and several prompts in one request (each queued with the adapter)
    stream = server.client().completions.create(model="sql", prompt=PROMPT, stream=True,
                                                logprobs=0, extra_body=AS_IDS, **GREEDY)
    streamed: list[int] = []
    for chunk in stream:
        assert chunk.model == "sql"
        streamed += ids_of(chunk.choices[0].logprobs.tokens or []) if chunk.choices and \
            chunk.choices[0].logprobs else []
    assert streamed == got["sql"]
    both = server.client().completions.create(model="chat", prompt=[PROMPT, "Hello"],
                                              logprobs=0, extra_body=AS_IDS, **GREEDY)
    assert ids_of(both.choices[0].logprobs.tokens or []) == got["chat"]  # type: ignore[union-attr]
    server.assert_no_leaks()


def test_chat_runs_the_named_adapter(server: LoRAServer) -> None:
    client = server.client()
    loras = server.ctx.models.lora_requests
    ids = prompt_ids(server, model="sql", messages=HELLO)
    got = {}
    for model in ("tiny", "sql", "chat"):
        out = client.chat.completions.create(model=model, messages=HELLO,  # type: ignore[arg-type]
                                             logprobs=True, extra_body=AS_IDS, **GREEDY)
        assert out.model == model and out.choices[0].logprobs is not None
        got[model] = ids_of([t.token for t in out.choices[0].logprobs.content or []])
    assert len({tuple(v) for v in got.values()}) == 3
    assert got["tiny"] == direct(server, ids, None, "chat-base")
    for name in ("sql", "chat"):
        assert got[name] == direct(server, ids, loras[name], f"chat-{name}")
    streamed: list[int] = []
    for chunk in client.chat.completions.create(model="chat", messages=HELLO,  # type: ignore[arg-type]
                                                stream=True, logprobs=True, extra_body=AS_IDS,
                                                **GREEDY):
        assert chunk.model == "chat"
        for choice in chunk.choices:
            streamed += ids_of([t.token for t in (choice.logprobs.content or [])]
                               if choice.logprobs else [])
    assert streamed == got["chat"]
    server.assert_no_leaks()


def test_an_unknown_model_is_404(server: LoRAServer, tiny_llama_path: Path) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO,  # type: ignore[arg-type]
                                       max_tokens=2, stream=True)
    for path, body in (("/v1/completions", {"model": "nope", "prompt": "x"}),
                       ("/v1/chat/completions", {"model": "nope", "messages": HELLO}),
                       ("/tokenize", {"model": "nope", "prompt": "x"})):
        response = server.post(path, body)
        assert response.status_code == 404
        assert response.json() == {"error": {
            "message": "The model `nope` does not exist.", "type": "NotFoundError",
            "param": "model", "code": 404}}
    assert httpx.get(server.url("/v1/models/nope")).status_code == 404
    # the base model's names are served as before, and the adapters' work for /tokenize
    for name in ("tiny-alias", str(tiny_llama_path)):
        assert client.completions.create(model=name, prompt="x", max_tokens=1).model == "tiny"
    assert server.post("/tokenize", {"model": "chat", "prompt": "x"}).status_code == 200
    server.assert_no_leaks()


def test_load_use_reload_and_unload(server: LoRAServer, adapters: dict[str, Path]) -> None:
    engine, models = server.engine, server.ctx.models
    ids = prompt_ids(server, prompt=PROMPT)
    response = server.post(LOAD, {"lora_name": "dyn", "lora_path": str(adapters["other"])})
    assert (response.status_code, response.text) == (
        200, "Success: LoRA adapter 'dyn' added successfully.")
    dyn = models.lora_requests["dyn"]
    assert dyn.lora_int_id in server.call(engine.list_loras())
    card = server.client().models.retrieve("dyn").model_extra or {}
    assert (card["root"], card["parent"]) == (str(adapters["other"]), "tiny")
    first = complete(server, "dyn")
    assert first == direct(server, ids, dyn, "dyn") and first != complete(server, "tiny")
    again = server.post(LOAD, {"lora_name": "dyn", "lora_path": str(adapters["other"])})
    assert_error(again, 400, contains="The lora adapter 'dyn' has already been loaded.")
    # in place: the same id, now the chat adapter's weights
    inplace = server.post(LOAD, {"lora_name": "dyn", "lora_path": str(adapters["chat"]),
                                 "load_inplace": True})
    assert inplace.status_code == 200, inplace.text
    assert models.lora_requests["dyn"].lora_int_id == dyn.lora_int_id
    assert complete(server, "dyn") == complete(server, "chat") != first
    gone = server.post(UNLOAD, {"lora_name": "dyn"})
    assert (gone.status_code, gone.text) == (
        200, "Success: LoRA adapter 'dyn' removed successfully.")
    assert dyn.lora_int_id not in server.call(engine.list_loras())  # the engine unloaded it
    with pytest.raises(openai.NotFoundError):
        complete(server, "dyn")
    assert_error(server.post(UNLOAD, {"lora_name": "dyn"}), 404,
                 contains="The lora adapter 'dyn' cannot be found.")
    assert "dyn" not in [m.id for m in server.client().models.list().data]
    server.assert_no_leaks()


def _bad_loads(adapters: dict[str, Path]) -> list[tuple[Any, int, str | None, str]]:
    """(body, status, param, text in the message) of loads that must be refused."""
    good = str(adapters["other"])
    huge = b'{"lora_name": "x", "lora_path": "' + b"a" * (1 << 20) + b'"}'
    return [
        ({"lora_name": "bad", "lora_path": str(adapters["missing"])}, 404, "lora_path",
         "No adapter found"),
        ({"lora_name": "bad", "lora_path": str(adapters["dora"])}, 400, "lora_path", "DoRA"),
        ({"lora_name": "bad", "lora_path": str(adapters["big"])}, 400, "lora_path",
         "exceeds max_lora_rank=16"),
        ({"lora_name": "bad", "lora_path": str(adapters["corrupt"])}, 400, "lora_path",
         "corrupt"),
        ({"lora_name": "", "lora_path": good}, 400, "lora_name", "Both 'lora_name' and"),
        ({"lora_name": "bad"}, 400, "lora_path", "lora_path"),
        ({"lora_path": good}, 400, "lora_name", "lora_name"),
        ({"lora_name": 5, "lora_path": good}, 400, "lora_name", "lora_name"),
        ({"lora_name": "bad", "lora_path": good, "load_inplace": "yes"}, 400, "load_inplace",
         "load_inplace"),
        ({"lora_name": "tiny", "lora_path": good}, 400, "lora_name", "base model"),
        ({"lora_name": "sql", "lora_path": good}, 400, "lora_name", "already been loaded"),
        (b'{"lora_name": "bad", ', 400, None, "malformed JSON"),
        (b"[1]", 400, None, "JSON object"),
        (huge, 413, None, "larger than 1 MiB"),
    ]


def test_refusals_while_serving(server: LoRAServer, adapters: dict[str, Path]) -> None:
    """Bad loads and unloads are 4xx in OpenAI's shape; requests running beside them go on."""
    reference = complete(server, "sql")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        good = [pool.submit(complete, server, "sql") for _ in range(8)]
        for body, status, param, text in _bad_loads(adapters):
            assert_error(server.post(LOAD, body), status, param, contains=text)
        for body, status, param, text in [
            ({}, 400, "lora_name", "lora_name"),
            ({"lora_name": ""}, 400, "lora_name", "needs to be provided"),
            ({"lora_name": "never"}, 404, "lora_name", "cannot be found"),
            (b"{", 400, None, "malformed JSON"),
        ]:
            assert_error(server.post(UNLOAD, body), status, param, contains=text)
        assert all(f.result(60) == reference for f in good)
    assert list(server.ctx.models.lora_requests) == ["sql", "chat"]
    assert server.call(server.engine.list_loras()) == {1, 2}
    assert not server.ctx.models._locks
    server.assert_no_leaks()


async def _race(server: LoRAServer, path: str, body: dict[str, Any], n: int) -> list[int]:
    async with httpx.AsyncClient(timeout=60) as client:
        answers = await asyncio.gather(*(client.post(server.url(path), json=body)
                                         for _ in range(n)))
    return sorted(a.status_code for a in answers)


def test_loads_and_unloads_of_one_name_are_atomic(server: LoRAServer,
                                                   adapters: dict[str, Path]) -> None:
    body = {"lora_name": "race", "lora_path": str(adapters["other"])}
    assert asyncio.run(_race(server, LOAD, body, 6)) == [200] + [400] * 5
    race_id = server.ctx.models.lora_requests["race"].lora_int_id
    assert asyncio.run(_race(server, UNLOAD, {"lora_name": "race"}, 6)) == [200] + [404] * 5
    assert race_id not in server.call(server.engine.list_loras())
    assert "race" not in server.ctx.models.lora_requests
    server.assert_no_leaks()


def test_unload_while_its_stream_runs(server: LoRAServer, adapters: dict[str, Path]) -> None:
    """A running request finishes with the adapter it started with; then it is gone."""
    assert server.post(LOAD, {"lora_name": "live", "lora_path": str(adapters["other"])}
                       ).status_code == 200
    live = server.ctx.models.lora_requests["live"]
    ids = prompt_ids(server, prompt=PROMPT)
    params = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
    reference = server.generate(ids, params, live, "live-reference")
    stream = server.client().completions.create(
        model="live", prompt=PROMPT, stream=True, logprobs=0, extra_body=AS_IDS,
        temperature=0, max_tokens=300)
    got: list[int] = []
    finish = None
    for i, chunk in enumerate(stream):
        if i == 0:
            assert server.post(UNLOAD, {"lora_name": "live"}).status_code == 200
        for choice in chunk.choices:
            got += ids_of(choice.logprobs.tokens or []) if choice.logprobs else []
            finish = choice.finish_reason or finish
    assert finish == "length" and got == reference
    assert live.lora_int_id not in server.call(server.engine.list_loras())
    server.assert_no_leaks()


def _scrape(server: LoRAServer) -> str:
    return httpx.get(server.url("/metrics"), timeout=10).text


def _gauge(text: str, name: str, lora_name: str) -> float | None:
    match = re.search(rf'^{name}{{[^}}]*lora_name="{lora_name}"[^}}]*}} (\S+)$', text, re.M)
    return None if match is None else float(match.group(1))


def test_lora_metrics(server: LoRAServer, adapters: dict[str, Path]) -> None:
    text = _scrape(server)
    assert _gauge(text, "kvflow:lora_running_requests", "sql") == 0
    assert _gauge(text, "kvflow:lora_waiting_requests", "chat") == 0
    assert re.search(r'^kvflow:lora_requests_info\{.*max_lora="1".*\} \d', text, re.M)
    stream = server.client().completions.create(model="sql", prompt=PROMPT, stream=True,
                                                temperature=0, max_tokens=400,
                                                extra_body={"ignore_eos": True})
    next(iter(stream))
    text = _scrape(server)
    stream.close()  # hang up: the request is aborted
    assert _gauge(text, "kvflow:lora_running_requests", "sql") == 1
    assert re.search(r'^kvflow:lora_requests_info\{.*running_lora_adapters="sql"', text, re.M)
    assert server.post(LOAD, {"lora_name": "brief", "lora_path": str(adapters["other"])}
                       ).status_code == 200
    assert _gauge(_scrape(server), "kvflow:lora_running_requests", "brief") == 0
    assert server.post(UNLOAD, {"lora_name": "brief"}).status_code == 200
    server.assert_no_leaks()
    text = _scrape(server)
    assert 'lora_name="brief"' not in text  # an unloaded adapter's series go
    assert _gauge(text, "kvflow:lora_running_requests", "sql") == 0


def test_runtime_endpoints_need_the_env_var(server: LoRAServer,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for value, allowed in (("1", True), ("true", True), (" TRUE ", True), ("0", False),
                           ("false", False), ("yes", False), ("", False)):
        monkeypatch.setenv(RUNTIME_LORA_ENV, value)
        assert runtime_lora_updating() is allowed, value
    monkeypatch.delenv(RUNTIME_LORA_ENV)
    # a second app over the same engine, built without the variable (no lifespan: the
    # engine is the fixture's)
    plain, port, serving = server.serve(build_app(server.ctx), lifespan="off")
    try:
        for path in (LOAD, UNLOAD):
            response = httpx.post(f"http://127.0.0.1:{port}{path}",
                                  json={"lora_name": "x", "lora_path": "/x"})
            assert_error(response, 404)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["tiny", "tiny-alias", "sql", "chat"]
    finally:
        plain.should_exit = True
        serving.result(30)
    server.assert_no_leaks()
