"""Prefix caching, priority scheduling and preemption with a real (tiny) model in-process."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvflow import LLM, SamplingParams
from kvflow.config import EngineArgs
from kvflow.engine.llm_engine import LLMEngine
from tests.engine.leaks import assert_core_clean


def greedy(n: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)  # type: ignore


def shared_prompt_requests(count: int, prefix_len: int = 400) -> list[dict]:
    rng = random.Random(0)
    system = [rng.randrange(100, 40000) for _ in range(prefix_len)]
    return [{"prompt_token_ids": system + [rng.randrange(100, 40000) for _ in range(1 + i % 23)]}
            for i in range(count)]


def test_shared_system_prompt_hits_the_cache(tiny_llama_path: Path) -> None:
    prompts = shared_prompt_requests(64)
    outputs = {}
    for caching in (False, True):
        llm = LLM(str(tiny_llama_path), enable_prefix_caching=caching, kv_cache_memory_gb=0.05)
        first = llm.generate(prompts[:1], greedy(8), use_tqdm=False)
        rest = llm.generate(prompts[1:], greedy(8), use_tqdm=False)
        outputs[caching] = [o.outputs[0].token_ids for o in first + rest]
        if caching:
            shared = 400 // 16 * 16  # only full blocks are shared
            cached = [o.num_cached_tokens for o in rest]
            assert sum(cached) >= 0.9 * shared * len(rest)
            stats = llm.llm_engine.core.get_stats()
            assert stats.prefix_cache_hits >= 0.9 * shared * len(rest)
        else:
            assert all(o.num_cached_tokens == 0 for o in rest)
        assert_core_clean(llm.llm_engine.core)
    assert outputs[True] == outputs[False]


def test_cache_salt_isolates_tenants(tiny_llama_path: Path) -> None:
    llm = LLM(str(tiny_llama_path), kv_cache_memory_gb=0.05)
    prompt = shared_prompt_requests(1, 64)
    llm.generate(prompt, greedy(2, cache_salt="a"), use_tqdm=False)
    other = llm.generate(prompt, greedy(2, cache_salt="b"), use_tqdm=False)[0]
    same = llm.generate(prompt, greedy(2, cache_salt="a"), use_tqdm=False)[0]
    assert other.num_cached_tokens == 0
    assert same.num_cached_tokens == 64  # 65 tokens: 4 full blocks
    assert_core_clean(llm.llm_engine.core)


def test_reset_prefix_cache(tiny_llama_path: Path) -> None:
    llm = LLM(str(tiny_llama_path), kv_cache_memory_gb=0.05)
    prompt = shared_prompt_requests(1, 64)
    llm.generate(prompt, greedy(2), use_tqdm=False)
    core = llm.llm_engine.core
    assert core.kv.cached
    assert core.reset_prefix_cache()
    assert llm.generate(prompt, greedy(2), use_tqdm=False)[0].num_cached_tokens == 0


def test_priority_admission_order(tiny_llama_path: Path) -> None:
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(tiny_llama_path), max_num_seqs=1, scheduling_policy="priority",
        kv_cache_memory_gb=0.05))
    priorities = [2, 1, 1, 0]
    arrival_order = [1, 3, 2, 4]
    reqs = sorted(range(4), key=lambda i: arrival_order[i])
    for i in reqs:
        engine.add_request(str(i), {"prompt_token_ids": [100 + i] * 5}, greedy(2),
                           priority=priorities[i])
    admitted: list[str] = []
    while engine.has_unfinished_requests():
        engine.step()
        for rid in engine.core.scheduler.running:
            if rid.request_id not in admitted:
                admitted.append(rid.request_id)
    assert admitted == ["3", "2", "1", "0"]
    assert_core_clean(engine.core)


def test_priority_preempts_the_low_priority_request(tiny_llama_path: Path) -> None:
    prompt_low = {"prompt_token_ids": [200] * 60}
    prompt_high = {"prompt_token_ids": [300] * 60}
    alone = LLM(str(tiny_llama_path), kv_cache_memory_gb=0.05)
    expected_low = alone.generate(prompt_low, greedy(100), use_tqdm=False)[0].outputs[0].token_ids
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(tiny_llama_path), scheduling_policy="priority", num_kv_blocks=18,
        enable_prefix_caching=False))
    engine.add_request("low", prompt_low, greedy(100), priority=5)
    engine.step()
    engine.add_request("high", prompt_high, greedy(100), priority=0)
    order: list[str] = []
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                order.append(out.request_id)
                tokens[out.request_id] = list(out.outputs[0].token_ids)
    assert engine.core.scheduler.num_preemptions > 0
    assert order == ["high", "low"]
    assert tokens["low"] == expected_low
    assert_core_clean(engine.core)


@pytest.mark.slow
def test_soak_2000_requests_with_aborts_and_priorities(tiny_llama_path: Path) -> None:
    rng = random.Random(1)
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(tiny_llama_path), scheduling_policy="priority", num_kv_blocks=40,
        max_num_seqs=32, max_num_batched_tokens=512))
    expected: dict[str, int] = {}
    aborted: set[str] = set()
    produced: dict[str, int] = {}
    live: list[str] = []
    for i in range(2000):
        rid = f"s{i}"
        prompt = {"prompt_token_ids": [rng.randrange(3, 40000) for _ in range(rng.randint(1, 80))]}
        expected[rid] = rng.randint(1, 12)
        engine.add_request(rid, prompt, greedy(expected[rid]), priority=rng.randint(0, 3))
        live.append(rid)
        if rng.random() < 0.6:
            for out in engine.step():
                if out.finished:
                    produced[out.request_id] = len(out.outputs[0].token_ids)
        if rng.random() < 0.1:
            victim = rng.choice(live)
            if victim not in produced:
                engine.abort_request(victim)
                aborted.add(victim)
    steps = 0
    while engine.has_unfinished_requests():
        steps += 1
        assert steps < 100_000, "deadlock"
        for out in engine.step():
            if out.finished:
                produced[out.request_id] = len(out.outputs[0].token_ids)
    for rid, n in expected.items():
        if rid not in aborted:
            assert produced[rid] == n, rid
    assert_core_clean(engine.core)
