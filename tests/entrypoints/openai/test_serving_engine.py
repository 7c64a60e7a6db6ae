"""The shared serving helpers, without a server or a model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from kvflow.entrypoints.openai.errors import OpenAIError
from kvflow.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from kvflow.entrypoints.openai.serving_engine import (
    build_sampling_params,
    cancel_on_disconnect,
    merge_async_iterators,
    refuse_unsupported,
    resolve_max_tokens,
    sse_stream,
)
from kvflow.errors import EngineDeadError
from kvflow.sampling_params import RequestOutputKind


def test_max_tokens_defaults_to_the_rest_of_the_context() -> None:
    assert resolve_max_tokens(None, 100, 2048, "prompt") == 1948
    assert resolve_max_tokens(1948, 100, 2048, "prompt") == 1948
    with pytest.raises(OpenAIError) as too_many:
        resolve_max_tokens(1949, 100, 2048, "prompt")
    assert too_many.value.status == 400 and too_many.value.param == "max_tokens"
    with pytest.raises(OpenAIError) as too_long:
        resolve_max_tokens(None, 2048, 2048, "messages")
    assert too_long.value.param == "messages"


@pytest.mark.parametrize("extra,param", [
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"best_of": 3}, "best_of"),
    ({"guided_regex": "a+"}, "guided_regex"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_unsupported_parameters_are_refused(extra: dict[str, object], param: str) -> None:
    request = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], **extra})
    with pytest.raises(OpenAIError) as info:
        refuse_unsupported(request)
    assert info.value.param == param and param in info.value.message


def test_harmless_values_pass() -> None:
    request = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "text"},
        "tool_choice": "none", "best_of": 1, "stream": True,
        "stream_options": {"include_usage": True}, "unknown_field": 1})
    refuse_unsupported(request)
    assert request.ignored_fields() == ["unknown_field"]


def test_sampling_params_mapping() -> None:
    request = CompletionRequest.model_validate({
        "prompt": "x", "temperature": 0.5, "top_k": 5, "stop": "END", "seed": 3, "n": 2,
        "logit_bias": {"7": 2.5}, "ignore_eos": True, "min_tokens": 2})
    params = build_sampling_params(request, max_tokens=9, logprobs=2, prompt_logprobs=None,
                                   stream=True)
    assert (params.temperature, params.top_k, params.stop, params.seed, params.n) == (
        0.5, 5, ["END"], 3, 2)
    assert params.logit_bias == {7: 2.5} and params.max_tokens == 9 and params.logprobs == 2
    assert params.ignore_eos and params.min_tokens == 2
    assert params.output_kind == RequestOutputKind.DELTA
    bad = CompletionRequest.model_validate({"prompt": "x", "logit_bias": {"seven": 1}})
    with pytest.raises(OpenAIError, match="logit_bias"):
        build_sampling_params(bad, max_tokens=1, logprobs=None, prompt_logprobs=None,
                              stream=False)


async def _counting(values: list[int], closed: list[int], delay: float) -> AsyncIterator[int]:
    try:
        for v in values:
            await asyncio.sleep(delay)
            yield v
    finally:
        closed.append(values[0])


async def test_merge_interleaves_and_closes_everything() -> None:
    closed: list[int] = []
    merged = merge_async_iterators([_counting([1, 2, 3], closed, 0.001),
                                    _counting([10, 20], closed, 0.0015)])
    items = [item async for item in merged]
    assert sorted(items) == [(0, 1), (0, 2), (0, 3), (1, 10), (1, 20)]
    closed.clear()
    merged = merge_async_iterators([_counting([1, 2, 3], closed, 0.001),
                                    _counting([10, 20], closed, 0.5)])
    assert await anext(merged) == (0, 1)
    await merged.aclose()  # e.g. the client went away: every stream must be closed
    assert sorted(closed) == [1, 10]


async def test_sse_stream_turns_errors_into_an_event() -> None:
    async def failing() -> AsyncIterator[CompletionRequest]:
        yield CompletionRequest(prompt="x")
        raise EngineDeadError("gone")

    events = [e async for e in sse_stream(failing())]
    assert events[0].startswith("data: {") and events[-1] == "data: [DONE]\n\n"
    error = json.loads(events[1][len("data: "):])["error"]
    assert error["code"] == 503 and error["message"] == "gone"


async def test_cancel_on_disconnect() -> None:
    cleaned = asyncio.Event()

    async def work() -> str:
        try:
            await asyncio.sleep(10)
            return "done"
        finally:
            cleaned.set()

    async def disconnect() -> None:
        await asyncio.sleep(0.01)

    with pytest.raises(OpenAIError) as info:
        await cancel_on_disconnect(work(), disconnect)
    assert info.value.status == 499 and cleaned.is_set()

    async def quick() -> str:
        return "ok"

    assert await cancel_on_disconnect(quick(), lambda: asyncio.sleep(10)) == "ok"
