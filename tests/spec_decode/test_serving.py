"""AsyncLLM streams and the OpenAI server with speculation on; aborts leave nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from kvflow import LLM, RequestOutputKind, SamplingParams
from kvflow.config import AsyncEngineArgs
from kvflow.engine.async_llm import AsyncLLM
from tests.engine.test_async_llm import assert_engine_clean
from tests.entrypoints.conftest import TINY_ARGS, RemoteServer

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
        "prompt_lookup_max": 3}
PROMPT = "one two three four one two three four one two three four one two"


def sp(n: int, kind: RequestOutputKind = RequestOutputKind.DELTA) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, output_kind=kind)


async def test_async_streams_and_abort(tiny_llama_path: Path) -> None:
    plain = LLM(str(tiny_llama_path), kv_cache_memory_gb=0.05)
    expected = plain.generate([PROMPT], sp(40, RequestOutputKind.FINAL_ONLY),
                              use_tqdm=False)[0].outputs[0]
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(tiny_llama_path), kv_cache_memory_gb=0.05, disable_log_stats=True,
        speculative_config=json.dumps(SPEC)))
    try:
        outs = [o async for o in engine.generate(PROMPT, sp(40), "s0")]
        assert [t for o in outs for t in o.outputs[0].token_ids] == expected.token_ids
        assert "".join(o.outputs[0].text for o in outs) == expected.text
        stats = await engine.get_scheduler_stats()
        assert stats.spec_num_accepted_tokens > 0
        # several tokens in one output: fewer outputs than tokens
        assert len(outs) < 40

        seen = asyncio.Event()

        async def consume() -> int:
            count = 0
            async for out in engine.generate(PROMPT, sp(400), "long"):
                count += len(out.outputs[0].token_ids)
                seen.set()
            return count

        task = asyncio.create_task(consume())
        await seen.wait()
        await engine.abort(["long"])
        assert await task < 400
        await assert_engine_clean(engine)
    finally:
        engine.shutdown()


@pytest.mark.slow  # a server process
def test_server_streams_with_speculation(tiny_llama_path: Path) -> None:
    args = [str(tiny_llama_path), *TINY_ARGS, "--speculative-config", json.dumps(SPEC)]
    with RemoteServer(args) as server:
        client = server.client()
        full = client.completions.create(model=str(tiny_llama_path), prompt=PROMPT,
                                         max_tokens=30, temperature=0.0)
        stream = client.completions.create(model=str(tiny_llama_path), prompt=PROMPT,
                                           max_tokens=30, temperature=0.0, stream=True)
        text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
        assert text == full.choices[0].text
        assert full.usage is not None and full.usage.completion_tokens == 30
        import httpx

        metrics = httpx.get(server.url("/metrics")).text
        assert "kvflow:spec_decode_num_accepted_tokens_total" in metrics
        assert 'kvflow:spec_decode_num_accepted_tokens_per_pos_total{model_name=' in metrics
