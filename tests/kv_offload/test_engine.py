"""The second KV tier in the engine: greedy outputs equal those without it while most prefix
hits come from it; the disk level serves a restarted engine and ignores corrupt, truncated
and foreign files; aborts during a load and preemption leave no leak; bad arguments fail."""

from __future__ import annotations

import gc
import logging
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.core.kv_cache import hash_block
from kvflow.engine.core import EngineCore
from kvflow.kv_offload.disk import SUFFIX, decode_block
from tests.engine.leaks import assert_core_clean

BLOCK_SIZE = 16
PREFIX_BLOCKS = 4
_rng = random.Random(0)
PREFIXES = [[_rng.randrange(100, 40000) for _ in range(PREFIX_BLOCKS * BLOCK_SIZE)]
            for _ in range(6)]
# 24 prompts, each of 6 prefixes four times: with a first tier of 14 blocks (two requests of
# 5 blocks each at a time) every prefix is evicted before it comes back
PROMPTS = [PREFIXES[i % 6] + [500 + i] for i in range(24)]
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0)
SMALL_FIRST_TIER: dict[str, Any] = {
    "dtype": "float32", "num_kv_blocks": 14, "block_size": BLOCK_SIZE, "max_num_seqs": 2,
    "num_threads": 1}  # (two threads on two shared cores spin-wait ~40x slower)
TIER_GB = 0.05
MODELS = ["tiny_llama_path", "tiny_qwen2_path"]


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """num_threads sets the process's torch threads: give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


Completion = tuple[list[int], list[float]]  # greedy tokens and their logprobs


def generate(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY,
             pair: int = 2) -> list[Completion]:
    """Greedy tokens and logprobs of the prompts, sent `pair` at a time."""
    completions = []
    for i in range(0, len(prompts), pair):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts[i:i + pair]], params,
                            use_tqdm=False)
        for out in outs:
            tokens = list(out.outputs[0].token_ids)
            logprobs = out.outputs[0].logprobs
            assert logprobs is not None
            completions.append((tokens, [lp[t].logprob for t, lp in zip(tokens, logprobs,
                                                                          strict=True)]))
    return completions


def assert_same(got: list[Completion], expected: list[Completion]) -> None:
    """Equal tokens, and logprobs equal up to float32 rounding. (The tiny Llama repeats its
    last prompt token whatever the KV; its logprobs move by >1e-3 if a loaded block is off
    by 1%, lands in the wrong layer, or swaps K and V.)"""
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    for index, ((_, mine), (_, theirs)) in enumerate(zip(got, expected, strict=True)):
        assert mine == pytest.approx(theirs, abs=1e-4), f"prompt {index}"


@cache
def baseline(model: str) -> tuple[list[Completion], int]:
    """Completions of the workload without a second tier, and its prefix-cache hits."""
    llm = LLM(model, **SMALL_FIRST_TIER)
    completions = generate(llm, PROMPTS)
    assert_clean(llm.llm_engine.core)
    return completions, llm.llm_engine.core.get_stats().prefix_cache_hits


def assert_clean(core: EngineCore) -> None:
    assert_core_clean(core)
    assert not core.scheduler.loading
    if core.offload is not None:
        assert not core.offload.loads


def block_hashes(prompt: list[int]) -> list[int]:
    """The prefix cache's hashes of the prompt's full blocks (no LoRA, no salt)."""
    hashes: list[int] = []
    for i in range(len(prompt) // BLOCK_SIZE):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block(parent, prompt[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE],
                                 (None, None)))
    return hashes


def block_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob(f"*{SUFFIX}")}


# ---- 1. parity, most prefix hits from the second tier ---------------------------------------
@pytest.mark.parametrize("model_fixture", MODELS)
def test_outputs_equal_with_most_hits_from_the_second_tier(
        model_fixture: str, request: pytest.FixtureRequest) -> None:
    model = str(request.getfixturevalue(model_fixture))
    expected, hits_without = baseline(model)
    assert hits_without == 0  # the first tier alone keeps nothing long enough
    llm = LLM(model, kv_offloading_size=TIER_GB, **SMALL_FIRST_TIER)
    assert_same(generate(llm, PROMPTS), expected)
    stats = llm.llm_engine.core.get_stats()
    # prompts 6..23 find their 4 prefix blocks evicted: each is loaded back from the tier
    assert stats.kv_offload_hit_blocks == stats.kv_offload_blocks_loaded == 18 * PREFIX_BLOCKS
    assert stats.prefix_cache_hits > 0
    assert stats.kv_offload_hit_blocks * BLOCK_SIZE >= 0.9 * stats.prefix_cache_hits
    assert stats.kv_offload_blocks_stored > 0 and stats.kv_offload_bytes_loaded > 0
    assert_clean(llm.llm_engine.core)


def test_prefix_cache_stats_count_each_prompt_once(tiny_llama_path: Path) -> None:
    llm = LLM(str(tiny_llama_path), kv_offloading_size=TIER_GB, **SMALL_FIRST_TIER)
    generate(llm, PROMPTS)
    stats = llm.llm_engine.core.get_stats()
    assert stats.prefix_cache_hits == 18 * PREFIX_BLOCKS * BLOCK_SIZE
    assert_clean(llm.llm_engine.core)
    # no preemption here: each prompt token is looked up once, as without the tier
    assert stats.prefix_cache_queries == sum(len(p) for p in PROMPTS)


# ---- 2. a restart with the disk tier ------------------------------------------------------
def test_a_restart_serves_from_disk_and_ignores_bad_files(
        tiny_llama_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = str(tiny_llama_path)
    expected, _ = baseline(model)
    tier = {"kv_offloading_size": TIER_GB, "kv_offloading_path": str(tmp_path)}
    first = LLM(model, **tier, **SMALL_FIRST_TIER)
    assert_same(generate(first, PROMPTS), expected)
    core = first.llm_engine.core
    assert core.offload is not None and core.offload.disk is not None
    folder = core.offload.disk.folder
    core.offload.flush()
    assert_clean(core)
    del first, core
    gc.collect()

    restarted = LLM(model, **tier, **SMALL_FIRST_TIER)
    assert_same(generate(restarted, PROMPTS[:2]), expected[:2])  # its first requests
    # prompts 0 and 1 were evicted by the first run: the restart loads them from disk
    assert restarted.llm_engine.core.get_stats().kv_offload_blocks_loaded == 2 * PREFIX_BLOCKS
    assert_same(generate(restarted, PROMPTS[2:]), expected[2:])
    restarted.llm_engine.core.offload.flush()  # type: ignore[union-attr]
    assert_clean(restarted.llm_engine.core)
    del restarted
    gc.collect()

    # another dtype is another model: its files go to another folder and are never mixed
    other = LLM(model, **{**tier, **SMALL_FIRST_TIER, "dtype": "bfloat16"})
    other_core = other.llm_engine.core
    assert other_core.offload is not None and other_core.offload.disk is not None
    other_folder = other_core.offload.disk.folder
    assert other_folder != folder and not other_core.offload.disk.index
    generate(other, PROMPTS[:6])
    assert other_core.get_stats().kv_offload_blocks_loaded == 0  # nothing of float32's
    other_core.offload.flush()
    assert_clean(other_core)
    del other, other_core
    gc.collect()
    other_files = block_files(other_folder)
    assert other_files

    # damage three block files of the float32 model, each read by the next run's first pass
    flipped = folder / f"{block_hashes(PROMPTS[0])[0]:016x}{SUFFIX}"
    truncated = folder / f"{block_hashes(PROMPTS[1])[2]:016x}{SUFFIX}"
    foreign = next(folder / name for name in (f"{h:016x}{SUFFIX}" for p in PROMPTS[2:6]
                                              for h in reversed(block_hashes(p)))
                   if name in other_files)
    data = bytearray(flipped.read_bytes())
    data[-7] ^= 0x10
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    foreign.write_bytes(other_files[foreign.name])  # the bfloat16 model's block, same hash
    bad = (flipped, truncated, foreign)

    with caplog.at_level(logging.WARNING, logger="kvflow.kv_offload.disk"):
        fresh = LLM(model, **tier, **SMALL_FIRST_TIER)
        assert_same(generate(fresh, PROMPTS), expected)
    fresh_core = fresh.llm_engine.core
    assert fresh_core.offload is not None and fresh_core.offload.disk is not None
    disk = fresh_core.offload.disk
    assert disk.num_dropped == 3
    logged = [r.getMessage() for r in caplog.records if "dropping KV block file" in r.getMessage()]
    assert len(logged) == 3
    assert all(any(str(path) in line for line in logged) for path in bad)
    assert "another model" in caplog.text
    assert fresh_core.get_stats().kv_offload_blocks_loaded > 0  # the good files still serve
    fresh_core.offload.flush()
    for path in bad:  # deleted, or written again from recomputed KV: never the bad bytes
        if path.exists():
            decode_block(path.read_bytes(), disk.model_key, int(path.stem, 16))
    assert block_files(other_folder) == other_files  # the other model's files untouched
    assert_clean(fresh_core)


def test_block_hashes_are_equal_in_another_process() -> None:
    """The disk tier's files are named by block hashes: a restarted server (another process,
    another PYTHONHASHSEED) must compute the same ones, salts and adapter keys included."""
    extra = ("adapter-digest", "tenant-salt")
    code = ("from kvflow.core.kv_cache import hash_block; "
            "print(hash_block(None, [1, 2, 3], ('adapter-digest', 'tenant-salt')), "
            "hash_block(7, [4], (None, None)))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out == [str(hash_block(None, [1, 2, 3], extra)), str(hash_block(7, [4], (None, None)))]


def test_a_quantized_engine_is_another_model_on_disk(tiny_llama_path: Path,
                                                     tmp_path: Path) -> None:
    model = str(tiny_llama_path)
    expected, _ = baseline(model)
    tier = {"kv_offloading_size": TIER_GB, "kv_offloading_path": str(tmp_path)}
    quantized = LLM(model, quantization="int8", **tier, **SMALL_FIRST_TIER)
    generate(quantized, PROMPTS[:6])  # prefixes 0..3 are written to disk
    quantized_core = quantized.llm_engine.core
    assert quantized_core.offload is not None and quantized_core.offload.disk is not None
    quantized_folder = quantized_core.offload.disk.folder
    quantized_core.offload.flush()
    assert_clean(quantized_core)
    del quantized, quantized_core
    gc.collect()
    llm = LLM(model, **tier, **SMALL_FIRST_TIER)
    core = llm.llm_engine.core
    assert core.offload is not None and core.offload.disk is not None
    assert_same(generate(llm, PROMPTS[:2]), expected[:2])
    assert core.offload.disk.folder != quantized_folder
    assert core.get_stats().kv_offload_blocks_loaded == 0
    assert_clean(core)


# ---- 3. abort during a load; preemption -----------------------------------------------------
def test_abort_while_a_load_is_in_flight(tiny_llama_path: Path) -> None:
    model = str(tiny_llama_path)
    expected, _ = baseline(model)
    llm = LLM(model, kv_offloading_size=TIER_GB, **SMALL_FIRST_TIER)
    generate(llm, PROMPTS[:6])  # prefix 0 is evicted to the second tier
    engine, core = llm.llm_engine, llm.llm_engine.core
    offload = core.offload
    assert offload is not None and offload.count_hits(block_hashes(PROMPTS[6])) == 4
    load = offload._load

    def slow_load(blocks: list[tuple[int, int]]) -> bool:
        time.sleep(0.3)  # still copying when the abort comes
        return load(blocks)

    offload._load = slow_load  # type: ignore[method-assign]
    engine.add_request("aborted", {"prompt_token_ids": PROMPTS[6]}, GREEDY)
    assert engine.step() == []
    assert "aborted" in core.scheduler.loading and "aborted" in offload.loads
    outputs = engine.abort_request("aborted")
    assert [o.finished for o in outputs] == [True]
    assert not engine.has_unfinished_requests()
    assert_clean(core)
    del offload._load
    # the abort waited for the copies: the loaded blocks joined the prefix cache intact
    assert all(h in core.kv.cached for h in block_hashes(PROMPTS[6]))
    loaded = core.get_stats().kv_offload_blocks_loaded
    hits = core.get_stats().prefix_cache_hits
    assert_same(generate(llm, [PROMPTS[6]]), [expected[6]])
    assert core.get_stats().prefix_cache_hits == hits + PREFIX_BLOCKS * BLOCK_SIZE
    assert core.get_stats().kv_offload_blocks_loaded == loaded  # first-tier hits this time
    assert_clean(core)


def test_preemption_with_the_second_tier_keeps_parity(tiny_qwen2_path: Path) -> None:
    # four requests of 65 + 60 tokens (8 blocks each) in 14 blocks: preemptions
    model = str(tiny_qwen2_path)
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True, logprobs=0)
    kwargs = {**SMALL_FIRST_TIER, "max_num_seqs": 4}
    results = {}
    for tier in (None, TIER_GB):
        llm = LLM(model, kv_offloading_size=tier, **kwargs)
        results[tier] = generate(llm, PROMPTS[:4], params, pair=4)
        core = llm.llm_engine.core
        assert core.scheduler.num_preemptions > 0
        if tier:
            assert core.get_stats().kv_offload_blocks_loaded > 0  # the victims' blocks
        assert_clean(core)
    assert_same(results[TIER_GB], results[None])
    first_four = [(tokens[:4], logprobs[:4]) for tokens, logprobs in results[None]]
    assert_same(first_four, baseline(model)[0][:4])


def test_sleep_spills_the_prefix_cache_to_the_second_tier(tiny_llama_path: Path) -> None:
    model = str(tiny_llama_path)
    expected, _ = baseline(model)
    llm = LLM(model, kv_offloading_size=TIER_GB, enable_sleep_mode=True, **SMALL_FIRST_TIER)
    assert_same(generate(llm, PROMPTS[:2]), expected[:2])
    core = llm.llm_engine.core
    llm.sleep(level=1)
    assert not core.kv.cached
    llm.wake_up()
    assert_same(generate(llm, PROMPTS[6:8]), expected[6:8])  # prefixes 0 and 1 again
    assert core.get_stats().kv_offload_blocks_loaded == 2 * PREFIX_BLOCKS
    assert_clean(core)


# ---- 4. bad arguments -----------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kv_offloading_path": "DIR"}, "needs kv_offloading_size"),
    ({"kv_offloading_size": 0}, "must be > 0"),
    ({"kv_offloading_size": -1.0}, "must be > 0"),
    ({"kv_offloading_size": True}, "must be > 0"),
    ({"kv_offloading_size": 1, "enable_prefix_caching": False}, "enable_prefix_caching"),
    ({"kv_offloading_size": 1, "kv_offloading_path": "DIR", "kv_offloading_disk_size": 0},
     "kv_offloading_disk_size"),
    ({"kv_offloading_size": 1, "kv_offloading_backend": "lmcache"}, "native"),
])
def test_bad_arguments_are_value_errors(tiny_llama_path: Path, tmp_path: Path,
                                        kwargs: dict[str, Any], match: str) -> None:
    folder = tmp_path / "kv"
    kwargs = {k: str(folder) if v == "DIR" else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        LLM(str(tiny_llama_path), **kwargs)
    assert not folder.exists()
