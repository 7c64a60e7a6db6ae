"""Structured output through AsyncLLM with the core in its own process: streaming, errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import pytest

from kvflow import RequestOutputKind, SamplingParams
from kvflow.config import AsyncEngineArgs
from kvflow.engine.async_llm import AsyncLLM
from kvflow.sampling_params import StructuredOutputsParams
from tests.engine.test_async_llm import assert_engine_clean
from tests.structured.test_generate import NUM_THREADS, SCHEMA

PROMPT = "Describe one user of a web shop as JSON: "


@pytest.fixture(scope="module")
def engine(default_model_path: Path):
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(default_model_path), kv_cache_memory_gb=0.25, disable_log_stats=True,
        num_threads=NUM_THREADS))
    yield llm
    llm.shutdown()


def params(kind: RequestOutputKind, seed: int, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=160, output_kind=kind,
                          structured_outputs=StructuredOutputsParams(json=SCHEMA),
                          **kw)  # type: ignore[arg-type]


async def run(engine: AsyncLLM, request_id: str, sp: SamplingParams) -> tuple[str, list[int]]:
    text, ids = "", list[int]()
    async for out in engine.generate(PROMPT, sp, request_id):
        completion = out.outputs[0]
        if sp.output_kind == RequestOutputKind.DELTA:
            text, ids = text + completion.text, ids + list(completion.token_ids)
        else:
            text, ids = completion.text, list(completion.token_ids)
    return text, ids


async def test_streamed_equals_final_only_for_the_same_seed(engine: AsyncLLM) -> None:
    seeds = range(3)
    kinds = (RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY)
    results = await asyncio.gather(*(
        run(engine, f"{kind.name}-{s}", params(kind, s)) for kind in kinds for s in seeds))
    streamed, final = results[:len(seeds)], results[len(seeds):]
    assert streamed == final
    for text, _ in final:
        jsonschema.validate(json.loads(text), SCHEMA)
    await assert_engine_clean(engine)


async def test_invalid_schema_is_a_value_error_and_the_engine_goes_on(engine: AsyncLLM) -> None:
    bad = SamplingParams(structured_outputs=StructuredOutputsParams(
        json={"type": "object", "properties": {"x": {"enum": []}}, "required": ["x"]}))
    with pytest.raises(ValueError, match="structured_outputs"):
        async for _ in engine.generate(PROMPT, bad, "bad"):
            pass
    assert not engine.has_unfinished_requests()
    text, _ = await run(engine, "bad", params(RequestOutputKind.FINAL_ONLY, 9))  # id is free
    jsonschema.validate(json.loads(text), SCHEMA)
    await assert_engine_clean(engine)
