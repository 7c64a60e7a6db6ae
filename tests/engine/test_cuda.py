"""The CUDA path end to end: parity with transformers, chunking, preemption, 16-bit, AsyncLLM.

Skipped where torch sees no GPU. Tiny random models only, so the tests can run on a GPU
machine without the packaged default model (set KVFLOW_TEST_TOKENIZER_DIR there).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from kvflow import LLM, RequestOutputKind, SamplingParams
from kvflow.config import AsyncEngineArgs
from kvflow.engine.async_llm import AsyncLLM
from tests.engine.test_async_llm import assert_engine_clean, params
from tests.engine.test_llm import (
    NEW_TOKENS,
    PROMPT_LENS,
    greedy,
    hf_greedy,
    kv_generate,
    prompt_ids,
)

pytestmark = pytest.mark.gpu

CUDA = dict(device="cuda", gpu_memory_utilization=0.1)


@pytest.mark.parametrize("fixture", ["tiny_llama_path", "tiny_qwen2_path"])
def test_tiny_models_match_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    llm = LLM(str(path), dtype="float32", **CUDA)  # type: ignore[arg-type]
    assert llm.llm_engine.core.runner.kv_caches[0].device.type == "cuda"
    prompts = prompt_ids(llm.get_tokenizer())
    assert kv_generate(llm, prompts, greedy()) == hf_greedy(path, prompts, NEW_TOKENS)


def test_engines_share_the_gpu_by_their_fractions(tiny_llama_path: Path) -> None:
    first = LLM(str(tiny_llama_path), device="cuda", gpu_memory_utilization=0.2)
    second = LLM(str(tiny_llama_path), device="cuda", gpu_memory_utilization=0.2)
    free, total = torch.cuda.mem_get_info()
    for llm in (first, second):
        runner = llm.llm_engine.core.runner
        kv_bytes = sum(c.numel() * c.element_size() for c in runner.kv_caches)
        # weights and the profiled step (logits of 4,096 tokens) take under 4 GiB here
        assert 0.2 * total - 4 * 2**30 < kv_bytes < 0.2 * total
        assert len(llm.generate("Hello", greedy(4), use_tqdm=False)[0].outputs[0].token_ids) == 4
    too_much = min(1.0, free / total + 0.05)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(str(tiny_llama_path), device="cuda", gpu_memory_utilization=too_much)


def test_chunked_prefill_and_preemption_give_the_same_tokens(tiny_llama_path: Path) -> None:
    blocks_for_longest = -(-(max(PROMPT_LENS) + NEW_TOKENS) // 16)
    llm = LLM(str(tiny_llama_path), dtype="float32", max_num_batched_tokens=32,
              num_kv_blocks=blocks_for_longest + 2, **CUDA)  # type: ignore[arg-type]
    prompts = prompt_ids(llm.get_tokenizer())
    assert kv_generate(llm, prompts, greedy()) == hf_greedy(tiny_llama_path, prompts, NEW_TOKENS)
    assert llm.llm_engine.core.scheduler.num_preemptions > 0


def test_prefix_cache_hit_gives_the_same_tokens(tiny_llama_path: Path) -> None:
    llm = LLM(str(tiny_llama_path), dtype="float32", **CUDA)  # type: ignore[arg-type]
    prompt = prompt_ids(llm.get_tokenizer())[-1]
    first = llm.generate({"prompt_token_ids": prompt}, greedy(), use_tqdm=False)[0]
    again = llm.generate({"prompt_token_ids": prompt}, greedy(), use_tqdm=False)[0]
    assert again.num_cached_tokens == len(prompt) // 16 * 16 > 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_bfloat16_is_the_default_and_tracks_float32(tiny_llama_path: Path) -> None:
    llm = LLM(str(tiny_llama_path), **CUDA)  # type: ignore[arg-type]
    assert llm.llm_engine.core.runner.kv_caches[0].dtype == torch.bfloat16
    prompts = prompt_ids(llm.get_tokenizer())
    ours = kv_generate(llm, prompts, greedy())
    reference = hf_greedy(tiny_llama_path, prompts, NEW_TOKENS)
    assert all(len(o) == NEW_TOKENS for o in ours)
    # bfloat16 rounding flips near-ties of a random model, so whole sequences may part ways;
    # the first token of most prompts still agrees with float32.
    assert sum(o[0] == r[0] for o, r in zip(ours, reference, strict=True)) >= len(prompts) // 2


async def test_async_llm_streams_aborts_and_fans_out(tiny_llama_path: Path) -> None:
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(tiny_llama_path), dtype="float32", max_num_seqs=64, disable_log_stats=True,
        **CUDA))  # type: ignore[arg-type]
    try:
        async def count(request_id: str, sp: SamplingParams) -> int:
            n = 0
            async for out in engine.generate("Tell me a story", sp, request_id):
                n += sum(len(c.token_ids) for c in out.outputs)
            return n

        long = [asyncio.create_task(count(f"long{i}", params(900))) for i in range(4)]
        counts = await asyncio.gather(*(count(f"r{i}", params(16)) for i in range(48)))
        assert counts == [16] * 48
        await engine.abort([f"long{i}" for i in range(2)])
        for task in long[2:]:
            task.cancel()
        await asyncio.gather(*long, return_exceptions=True)
        fan = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=5, ignore_eos=True,
                             output_kind=RequestOutputKind.DELTA)
        fanned = await count("fan", fan)
        assert fanned == 24
        await assert_engine_clean(engine)
    finally:
        engine.shutdown()
