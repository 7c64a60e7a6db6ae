"""The model runner: wide steps sample in parts of SAMPLE_ROWS rows, with the same results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.worker import model_runner
from tests.engine.leaks import assert_core_clean


def mixed_params(i: int) -> SamplingParams:
    """Greedy, seeded random with top-p/top-k, logprobs and penalties, in turn."""
    kinds = [
        SamplingParams(max_tokens=6, temperature=0.0),
        SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, seed=100 + i, logprobs=2),
        SamplingParams(max_tokens=6, temperature=1.2, top_k=20, seed=200 + i,
                       repetition_penalty=1.3, frequency_penalty=0.5),
        SamplingParams(max_tokens=6, temperature=0.0, logprobs=4, presence_penalty=0.8),
    ]
    return kinds[i % len(kinds)]


def run(path: Path) -> tuple[list[tuple[object, ...]], int]:
    """Each request's tokens and logprobs, and how many times the LM head ran."""
    llm = LLM(str(path), kv_cache_memory_gb=0.05, max_num_seqs=64)
    model = llm.llm_engine.core.runner.model
    calls = 0
    compute_logits = model.compute_logits

    def counting(hidden):  # type: ignore[no-untyped-def]
        # Row by row: a row's logits must not depend on how many rows share the call (the
        # C kernel and oneDNN round differently, and this random model is full of near-ties).
        nonlocal calls
        calls += 1
        return torch.cat([compute_logits(hidden[i:i + 1]) for i in range(hidden.shape[0])])

    model.compute_logits = counting
    prompts = [{"prompt_token_ids": [5 + i, 17, 300 + 7 * i, 42]} for i in range(22)]
    outs = llm.generate(prompts, [mixed_params(i) for i in range(22)], use_tqdm=False)
    assert_core_clean(llm.llm_engine.core)
    results = []
    for out in outs:
        c = out.outputs[0]
        lps = None if c.logprobs is None else [
            {t: round(lp.logprob, 4) for t, lp in step.items()} for step in c.logprobs]
        results.append((tuple(c.token_ids), lps))
    return results, calls


def test_wide_step_samples_in_parts_with_the_same_tokens_and_logprobs(
        tiny_llama_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole, whole_calls = run(tiny_llama_path)
    monkeypatch.setattr(model_runner, "SAMPLE_ROWS", 5)
    parts, part_calls = run(tiny_llama_path)
    assert parts == whole
    # 22 requests decode together: 5 parts per step instead of 1
    assert part_calls >= whole_calls + 4 * 5


def test_profile_step_covers_the_token_budget_in_sequences_of_max_model_len(
        tiny_llama_path: Path) -> None:
    # The GPU sizing's profiled step, run on the CPU: 100 tokens of budget, at most 48 per
    # sequence, is three sequences (48, 48, 4) whose temporary cache the runner reports.
    llm = LLM(str(tiny_llama_path), kv_cache_memory_gb=0.05, max_model_len=48,
              max_num_batched_tokens=100)
    runner = llm.llm_engine.core.runner
    seen: list[int] = []
    forward = runner.model.forward

    def counting(input_ids, positions, caches, metadata):  # type: ignore[no-untyped-def]
        seen.append(input_ids.shape[0])
        assert positions.tolist() == list(range(48)) * 2 + list(range(4))
        return forward(input_ids, positions, caches, metadata)

    runner.model.forward = counting
    temporary = runner._profile_peak_step(llm.llm_engine.core.config)
    blocks = 3 + 3 + 1  # 16-token blocks
    per_block = runner.kv_caches[0][:, 0].numel() * runner.kv_caches[0].element_size()
    assert seen == [100] and temporary == blocks * per_block * runner.model.num_layers
    assert_core_clean(llm.llm_engine.core)
