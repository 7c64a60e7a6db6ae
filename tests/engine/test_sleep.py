"""Sleep mode: sleep(level) frees the KV cache (1) and the weights (2), wake_up restores
them; outputs before and after are equal, the memory drop is measured, the prefix cache's
index goes with the KV, and requests around a sleep behave as documented; no leaks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil
import pytest

from kvflow import LLM, RequestOutputKind, SamplingParams
from kvflow.config import AsyncEngineArgs
from kvflow.engine.async_llm import AsyncLLM
from tests.engine.leaks import assert_core_clean
from tests.engine.test_async_llm import assert_engine_clean

PROMPTS = [[101, 2002, 303, 4004, 55, 66, 77, 88, 99, 110, 121, 132, 143, 154, 165, 176, 187],
           [7, 8, 9, 10]]
KV_GB = 0.25
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def rss() -> int:
    return psutil.Process().memory_info().rss


def tokens(llm: LLM) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def llm(tiny_llama_path: Path) -> LLM:
    return LLM(str(tiny_llama_path), dtype="float32", kv_cache_memory_gb=KV_GB,
               enable_sleep_mode=True, block_size=16)


def test_level_1_frees_the_kv_cache_and_its_prefix_index(llm: LLM) -> None:
    before = tokens(llm)
    core = llm.llm_engine.core
    assert tokens(llm) == before
    assert core.get_stats().prefix_cache_hits > 0  # the prompts' blocks are cached
    resident = rss()
    llm.sleep(level=1)
    dropped = resident - rss()
    assert llm.is_sleeping()
    assert dropped > 0.8 * KV_GB * 2**30, f"RSS fell by {dropped / 2**20:.0f} MiB only"
    assert not core.kv.cached  # no stale hash can point at discarded KV
    with pytest.raises(ValueError, match="asleep"):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, use_tqdm=False)
    llm.wake_up()
    assert not llm.is_sleeping()
    hits = core.get_stats().prefix_cache_hits
    assert tokens(llm) == before
    # the first run after waking computes everything: nothing was served from the old index
    assert core.get_stats().prefix_cache_hits == hits
    assert_core_clean(core)


def test_level_2_frees_the_weights_too_and_wakes_in_parts(llm: LLM) -> None:
    before = tokens(llm)
    runner = llm.llm_engine.core.runner
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    resident = rss()
    llm.sleep(level=2)
    dropped = resident - rss()
    assert dropped > 0.8 * KV_GB * 2**30 + 0.5 * weights, f"fell by {dropped / 2**20:.0f} MiB"
    llm.wake_up(["weights"])
    assert llm.is_sleeping()  # the KV cache is still asleep
    with pytest.raises(ValueError, match="asleep"):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, use_tqdm=False)
    llm.wake_up(["kv_cache"])
    assert not llm.is_sleeping()
    assert tokens(llm) == before
    assert_core_clean(llm.llm_engine.core)


def test_bad_calls_are_value_errors(llm: LLM, tiny_llama_path: Path) -> None:
    for level in (0, 3, True):
        with pytest.raises(ValueError, match="level"):
            llm.sleep(level=level)
    with pytest.raises(ValueError, match="tags"):
        llm.wake_up(["everything"])
    llm.wake_up()  # awake already: nothing to do
    off = LLM(str(tiny_llama_path), dtype="float32", num_kv_blocks=16)
    with pytest.raises(ValueError, match="enable_sleep_mode"):
        off.sleep()


@pytest.fixture(scope="module")
def engine(tiny_llama_path: Path):
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(tiny_llama_path), dtype="float32", kv_cache_memory_gb=KV_GB,
        enable_sleep_mode=True, disable_log_stats=True))
    yield llm
    llm.shutdown()


async def generate(engine: AsyncLLM, request_id: str, prompt: list[int],
                   max_tokens: int = 8) -> list[int]:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                        output_kind=RequestOutputKind.FINAL_ONLY)
    outs = [o async for o in engine.generate({"prompt_token_ids": prompt}, sp, request_id)]
    return list(outs[-1].outputs[0].token_ids)


def core_rss(engine: AsyncLLM) -> int:
    return psutil.Process(engine.engine_core.proc.pid).memory_info().rss  # type: ignore


async def test_async_sleep_waits_for_running_and_holds_new_requests(engine: AsyncLLM) -> None:
    before = await generate(engine, "ref", PROMPTS[0])
    running = asyncio.create_task(generate(engine, "running", PROMPTS[0], max_tokens=64))
    await asyncio.sleep(0.05)
    resident = core_rss(engine)
    await engine.sleep(level=1)  # returns once "running" is done
    assert running.done() and len(running.result()) == 64
    assert await engine.is_sleeping()
    dropped = resident - core_rss(engine)
    assert dropped > 0.8 * KV_GB * 2**30, f"the core's RSS fell by {dropped / 2**20:.0f} MiB"
    waiting = asyncio.create_task(generate(engine, "while-asleep", PROMPTS[0]))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # held until wake-up, not failed
    await engine.wake_up()
    assert not await engine.is_sleeping()
    assert await asyncio.wait_for(waiting, 30) == before
    await assert_engine_clean(engine)


async def test_async_level_2_and_partial_wake(engine: AsyncLLM) -> None:
    before = await generate(engine, "ref2", PROMPTS[1])
    await engine.sleep(level=2)
    await engine.wake_up(["kv_cache"])
    assert await engine.is_sleeping()  # weights still asleep
    waiting = asyncio.create_task(generate(engine, "held", PROMPTS[1]))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await engine.wake_up(["weights"])
    assert await asyncio.wait_for(waiting, 30) == before
    with pytest.raises(ValueError, match="level"):
        await engine.sleep(level=5)
    assert not await engine.is_paused()  # a refused sleep leaves the engine serving
    assert await generate(engine, "after", PROMPTS[1]) == before
    await assert_engine_clean(engine)
