"""Speculative decoding end to end on tiny models in-process: greedy outputs token for
token those of plain decoding, in every scheduling situation; stops, logprobs, penalties."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from kvflow import LLM, SamplingParams
from tests.engine.leaks import assert_core_clean

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3, "disable_by_batch_size": 64}


def prompts(count: int, seed: int = 0) -> list[dict]:
    """Half copy-friendly (a repeated phrase), half random token ids."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if i % 2 == 0:
            phrase = [rng.randrange(100, 40000) for _ in range(5 + i % 4)]
            ids = phrase * 4 + phrase[:2]
        else:
            ids = [rng.randrange(100, 40000) for _ in range(10 + i)]
        out.append({"prompt_token_ids": ids})
    return out


def run(path: Path, spec: dict | None, items: list[dict], params: Any,
        **engine: Any) -> tuple[list, LLM]:
    llm = LLM(str(path), speculative_config=spec, kv_cache_memory_gb=0.05, **engine)
    outputs = llm.generate(items, params, use_tqdm=False)
    assert_core_clean(llm.llm_engine.core)
    return outputs, llm


def greedy(n: int = 24, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def assert_same(base: list, spec: list) -> None:
    for a, b in zip(base, spec, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].text == a.outputs[0].text
        assert b.outputs[0].finish_reason == a.outputs[0].finish_reason


def accepted(llm: LLM) -> int:
    return llm.llm_engine.core.get_stats().spec_num_accepted_tokens


@pytest.mark.parametrize("engine", [
    {},  # mixed batch: some requests propose, some not
    pytest.param({"max_num_batched_tokens": 24}, marks=pytest.mark.slow),  # chunked prefill
    {"num_kv_blocks": 12, "max_num_seqs": 8},  # preemption and recompute
    pytest.param({"enable_prefix_caching": False}, marks=pytest.mark.slow),
], ids=["mixed", "chunked", "preempt", "no-prefix-cache"])
def test_greedy_identical_to_plain_decoding(tiny_llama_path: Path, engine: dict) -> None:
    items = prompts(8)
    base, _ = run(tiny_llama_path, None, items, greedy(), **engine)
    spec, llm = run(tiny_llama_path, NGRAM, items, greedy(), **engine)
    assert_same(base, spec)
    assert accepted(llm) > 0
    if "num_kv_blocks" in engine:
        assert llm.llm_engine.core.get_stats().num_preemptions > 0


def test_prefix_cache_hits_after_speculation(tiny_llama_path: Path) -> None:
    """A second round of the same prompts and outputs hits blocks written while verifying:
    their hashes name the accepted tokens only, so the outputs stay the same."""
    items = prompts(4, seed=3)
    base, _ = run(tiny_llama_path, None, items, greedy(40))
    llm = LLM(str(tiny_llama_path), speculative_config=NGRAM, kv_cache_memory_gb=0.05)
    first = llm.generate(items, greedy(40), use_tqdm=False)
    again = [{"prompt_token_ids": i["prompt_token_ids"] + o.outputs[0].token_ids[:30]}
             for i, o in zip(items, first, strict=True)]
    second = llm.generate(again, greedy(10), use_tqdm=False)
    assert_same(base, first)
    assert sum(o.num_cached_tokens for o in second) > 0
    for o, b in zip(second, base, strict=True):
        assert o.outputs[0].token_ids == b.outputs[0].token_ids[30:40]
    assert_core_clean(llm.llm_engine.core)


@pytest.mark.slow  # a dozen engines
def test_stops_inside_an_accepted_run(tiny_llama_path: Path) -> None:
    """max_tokens, stop strings and stop token ids cut a run of accepted tokens exactly
    where plain decoding stops."""
    items = prompts(8, seed=1)
    base, _ = run(tiny_llama_path, None, items, greedy(40))
    for n in (5, 11, 17):  # max_tokens inside runs
        short, _ = run(tiny_llama_path, NGRAM, items, greedy(n))
        for a, b in zip(base, short, strict=True):
            assert b.outputs[0].token_ids == a.outputs[0].token_ids[:n]
    for pick in (6, 13):
        stops = [o.outputs[0].text[pick * 2:pick * 2 + 3] for o in base]
        ids = [o.outputs[0].token_ids[pick] for o in base]
        for kind in ("stop", "stop_token_ids"):
            per_item = [greedy(40, **{kind: [s if kind == "stop" else i]})
                        for s, i in zip(stops, ids, strict=True)]
            plain, _ = run(tiny_llama_path, None, items, per_item)
            spec, llm = run(tiny_llama_path, NGRAM, items, per_item)
            assert_same(plain, spec)
            for a, b in zip(plain, spec, strict=True):
                assert a.outputs[0].stop_reason == b.outputs[0].stop_reason


@pytest.mark.slow  # six engines
def test_logprobs_and_penalties(tiny_llama_path: Path) -> None:
    """One logprobs entry per emitted token, equal to plain decoding's; penalties see the
    tokens accepted earlier in the same step."""
    items = prompts(6, seed=2)
    for extra in ({"logprobs": 2}, {"repetition_penalty": 1.3, "frequency_penalty": 0.5},
                  {"presence_penalty": 0.8, "logit_bias": {101: 2.0}}):
        base, _ = run(tiny_llama_path, None, items, greedy(20, **extra))
        spec, llm = run(tiny_llama_path, NGRAM, items, greedy(20, **extra))
        assert_same(base, spec)
        if "logprobs" in extra:
            for a, b in zip(base, spec, strict=True):
                la, lb = a.outputs[0].logprobs, b.outputs[0].logprobs
                assert la is not None and lb is not None and len(lb) == len(la) == 20
                for x, y in zip(la, lb, strict=True):
                    assert x.keys() == y.keys()
                    for t in x:
                        assert y[t].logprob == pytest.approx(x[t].logprob, abs=1e-4)


def assert_equal_or_near_tie(base: list, spec: list, tolerance: float = 1e-3) -> None:
    """Token for token, or diverging only where plain decoding's two best logprobs are
    within `tolerance` (a near-tie that summation order may flip)."""
    for a, b in zip(base, spec, strict=True):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        diverged = next((i for i, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y),
                        None)
        if diverged is None:
            assert ta == tb
            continue
        best = sorted((lp.logprob for lp in a.outputs[0].logprobs[diverged].values()),
                      reverse=True)
        assert best[0] - best[1] <= tolerance, (diverged, best)


@pytest.mark.slow  # the default model on a shared 2-core machine: ~1-2 min
def test_default_model_greedy_identical() -> None:
    text = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
            "Rewrite the code above with the functions renamed to plus and minus:\n")
    items = [text, "The capital of France is", text.replace("add", "total")]
    params = SamplingParams(max_tokens=40, temperature=0.0, logprobs=2)
    outputs = {}
    for name, spec in (("off", None), ("ngram", NGRAM)):
        llm = LLM(speculative_config=spec, kv_cache_memory_gb=0.2, max_model_len=1024,
                  num_threads=1)
        outputs[name] = llm.generate(items, params, use_tqdm=False)
        if spec is not None:
            assert accepted(llm) > 0
        assert_core_clean(llm.llm_engine.core)
        del llm
    assert_equal_or_near_tie(outputs["off"], outputs["ngram"])
