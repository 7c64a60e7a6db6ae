"""Tensor parallelism on the CPU: shards, TP=2 (gloo, two processes) against TP=1 token for
token under chunked prefill and preemption, and a dying worker."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from kvflow import LLM, AsyncLLM, SamplingParams
from kvflow.config import AsyncEngineArgs, EngineArgs
from kvflow.distributed.parallel_state import ModelShards, Shard, split_evenly
from kvflow.distributed.tp_layers import slice_weight
from kvflow.errors import EngineDeadError
from tests.engine.leaks import assert_core_clean

# Float32 logprobs of TP=2 and TP=1 differ only by summation order (all-reduce, vocabulary
# slices); a differing greedy token must be a near-tie within this.
LOGPROB_TOL = 2e-3
SMOL = {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
        "intermediate_size": 1536, "vocab_size": 49152}


@pytest.fixture(scope="module")
def uneven_llama_path(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A tiny random Llama whose 3 KV heads and 151 FFN columns split unevenly over 2."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=49152, hidden_size=96, intermediate_size=151, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=1024,
        tie_word_embeddings=True, eos_token_id=2, bos_token_id=1,
        architectures=["LlamaForCausalLM"])
    folder = tmp_path_factory.mktemp("uneven-llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in os.listdir(tokenizer_dir):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


@pytest.fixture
def own_threads() -> Iterator[None]:
    """An in-process TP engine pins this process's rank 0: undo it afterwards."""
    cpus, threads = os.sched_getaffinity(0), torch.get_num_threads()
    yield
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads)


def test_shards_of_the_default_model_are_uneven() -> None:
    first, second = (ModelShards.of(SMOL, rank, 2) for rank in (0, 1))
    assert (first.kv_heads, first.q_heads) == (Shard(0, 2), Shard(0, 6))
    assert (second.kv_heads, second.q_heads) == (Shard(2, 3), Shard(6, 9))
    assert first.intermediate == Shard(0, 768) and second.intermediate == Shard(768, 1536)
    assert first.vocab == Shard(0, 24576) and second.vocab == Shard(24576, 49152)
    assert [split_evenly(151, 2, r).size for r in (0, 1)] == [76, 75]
    assert second.local_config(SMOL)["num_key_value_heads"] == 1


def test_sliced_weights_put_back_together_are_the_checkpoint() -> None:
    config = dict(SMOL, head_dim=64)
    shards = [ModelShards.of(config, rank, 2) for rank in (0, 1)]
    q = torch.randn(9 * 64, 576)
    o = torch.randn(576, 9 * 64)
    bias = torch.randn(576)
    name = "model.layers.0.self_attn.{}.{}"
    assert torch.equal(torch.cat([slice_weight(name.format("q_proj", "weight"), q, s)
                                  for s in shards]), q)
    assert torch.equal(torch.cat([slice_weight(name.format("o_proj", "weight"), o, s)
                                  for s in shards], dim=1), o)
    # a row-parallel bias is added once: rank 0 holds it, the others zeros
    biases = [slice_weight(name.format("o_proj", "bias"), bias, s) for s in shards]
    assert torch.equal(biases[0] + biases[1], bias) and not biases[1].any()


def test_invalid_sizes_are_refused(uneven_llama_path: Path) -> None:
    with pytest.raises(ValueError, match="3 KV heads"):
        EngineArgs(model=str(uneven_llama_path), tensor_parallel_size=4).create_engine_config()
    with pytest.raises(ValueError, match="integer >= 1"):
        EngineArgs(model=str(uneven_llama_path), tensor_parallel_size=0).create_engine_config()
    with pytest.raises(ValueError, match="enable_lora"):
        EngineArgs(model=str(uneven_llama_path), tensor_parallel_size=2,
                   enable_lora=True).create_engine_config()


def test_cli_flag() -> None:
    import argparse

    parser = AsyncEngineArgs.add_cli_args(argparse.ArgumentParser())
    args = AsyncEngineArgs.from_cli_args(parser.parse_args(["--tensor-parallel-size", "2"]))
    assert args.tensor_parallel_size == 2


def _generate(model: str, tp: int, prompts: list[list[int]], max_tokens: int,
              **engine: Any) -> tuple[list[Any], int]:
    """Greedy outputs with top-2 logprobs, and the engine's preemption count; the engine is
    checked for leaks and its workers for exit."""
    llm = LLM(model, tensor_parallel_size=tp, num_threads=2, disable_log_stats=True,
              dtype="float32", **engine)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            logprobs=2)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    core = llm.llm_engine.core
    assert_core_clean(core)
    preemptions = core.scheduler.num_preemptions
    workers = list(getattr(core.executor, "workers", []))
    core.shutdown()
    assert all(proc.poll() is not None for proc in workers), "a worker outlived its engine"
    return [o.outputs[0] for o in outputs], preemptions


def _assert_same_greedy(expected: list[Any], actual: list[Any]) -> None:
    """Token for token, logprobs within LOGPROB_TOL; where a token differs, TP=1 must have
    nearly tied it with its own choice (then the texts may part ways)."""
    for ref, got in zip(expected, actual, strict=True):
        for pos, (want, have) in enumerate(zip(ref.token_ids, got.token_ids, strict=True)):
            ref_top, got_top = ref.logprobs[pos], got.logprobs[pos]
            if want != have:
                assert have in ref_top, f"position {pos}: {have} not among TP=1's top tokens"
                gap = ref_top[want].logprob - ref_top[have].logprob
                assert gap < LOGPROB_TOL, f"position {pos}: not a near-tie (gap {gap:.2e})"
                break
            assert abs(ref_top[want].logprob - got_top[have].logprob) < LOGPROB_TOL


# 4 prompts of 40-70 tokens, 16 new tokens each: 8 blocks of 16 cannot hold them all (the
# scheduler preempts), and a 32-token budget chunks every prefill.
TIGHT = {"num_kv_blocks": 8, "max_num_batched_tokens": 32, "max_num_seqs": 4}


def _prompts(count: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 49000, (40 + 10 * i,), generator=gen).tolist() for i in range(count)]


@pytest.mark.parametrize("model", ["uneven_llama_path", "tiny_qwen2_path"])
def test_tp2_matches_tp1_under_chunked_prefill_and_preemption(
        model: str, request: pytest.FixtureRequest, own_threads: None) -> None:
    path = str(request.getfixturevalue(model))
    prompts = _prompts(4)
    expected, _ = _generate(path, 1, prompts, 16, **TIGHT)
    actual, preemptions = _generate(path, 2, prompts, 16, **TIGHT)
    assert preemptions > 0
    _assert_same_greedy(expected, actual)


@pytest.mark.slow
def test_tp2_matches_tp1_on_the_default_model(own_threads: None) -> None:
    prompts = _prompts(4)
    engine = {"num_kv_blocks": 10, "max_num_batched_tokens": 48, "max_num_seqs": 4}
    expected, _ = _generate(None, 1, prompts, 16, **engine)  # type: ignore[arg-type]
    actual, preemptions = _generate(None, 2, prompts, 16, **engine)  # type: ignore[arg-type]
    assert preemptions > 0
    _assert_same_greedy(expected, actual)


def _tp_engine(path: Path) -> tuple[AsyncLLM, psutil.Process, list[psutil.Process]]:
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(path), tensor_parallel_size=2, num_kv_blocks=64, num_threads=2,
        disable_log_stats=True))
    core = psutil.Process(llm.engine_core.proc.pid)  # type: ignore[attr-defined]
    return llm, core, core.children()


def _gone(processes: list[psutil.Process], within_s: float) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=within_s)
    return not alive


def test_killed_worker_ends_every_stream_with_engine_dead_error(uneven_llama_path: Path) -> None:
    async def main() -> None:
        llm, core, workers = _tp_engine(uneven_llama_path)
        assert len(workers) == 1

        async def stream(i: int) -> BaseException | None:
            params = SamplingParams(max_tokens=5000, ignore_eos=True)
            try:
                async for _ in llm.generate({"prompt_token_ids": [5 + i] * 8}, params, f"r{i}"):
                    pass
            except EngineDeadError as exc:
                return exc
            return None

        tasks = [asyncio.create_task(stream(i)) for i in range(3)]
        await asyncio.sleep(1.0)
        killed = time.monotonic()
        workers[0].kill()
        ended = await asyncio.wait_for(asyncio.gather(*tasks), timeout=15)
        assert all(isinstance(e, EngineDeadError) for e in ended), ended
        assert time.monotonic() - killed < 10
        assert "worker 1 died" in str(ended[0])
        with pytest.raises(EngineDeadError):
            await llm.check_health()
        llm.shutdown()
        assert _gone([core, *workers], within_s=10)

    asyncio.run(main())


def test_worker_dying_while_idle_is_reported(uneven_llama_path: Path) -> None:
    async def main() -> None:
        llm, core, workers = _tp_engine(uneven_llama_path)
        workers[0].kill()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not llm.errored:
            await asyncio.sleep(0.1)
        with pytest.raises(EngineDeadError, match="worker 1 died"):
            await llm.check_health()
        llm.shutdown()
        assert _gone([core, *workers], within_s=10)

    asyncio.run(main())


def test_workers_exit_when_the_engine_core_is_killed(uneven_llama_path: Path) -> None:
    llm, core, workers = _tp_engine(uneven_llama_path)
    core.kill()
    assert _gone(workers, within_s=10)
    llm.shutdown()
