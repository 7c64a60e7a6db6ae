"""Random sampling with speculation follows the target model's distribution: the joint
distribution of the first three tokens, over a three-token alphabet, checked by a
chi-square test against the probabilities transformers computes for the same model."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from kvflow import LLM, SamplingParams
from tests.engine.leaks import assert_core_clean

ALPHABET = [300, 301, 302]
PROMPT = [300, 301, 302, 300, 301, 302, 300, 301, 302, 300]  # n-gram proposes 301, 302, ...
TEMPERATURE = 0.5  # the tiny random model's logits are small: sharpen them
NUM_SAMPLES = 600
DEPTH = 3


def target_joint(path: Path) -> dict[tuple[int, ...], float]:
    """P(first DEPTH tokens) under the model, restricted to ALPHABET at TEMPERATURE."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def next_probs(prefix: tuple[int, ...]) -> torch.Tensor:
        with torch.inference_mode():
            logits = model(torch.tensor([PROMPT + list(prefix)])).logits[0, -1]  # [V]
        return torch.softmax(logits[ALPHABET].double() / TEMPERATURE, dim=-1)  # [3]

    joint = {}
    for seq in itertools.product(ALPHABET, repeat=DEPTH):
        p = 1.0
        for i in range(DEPTH):
            p *= float(next_probs(seq[:i])[ALPHABET.index(seq[i])])
        joint[seq] = p
    return joint


def chi_square_critical(df: int, z: float = 3.72) -> float:
    """The chi-square value exceeded with probability ~1e-4 (Wilson-Hilferty)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


@pytest.mark.slow  # ~70 s on a shared 2-core machine: 600 requests over a 49k vocabulary
def test_sampled_distribution_matches_the_target(tiny_llama_path: Path) -> None:
    joint = target_joint(tiny_llama_path)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
            "prompt_lookup_max": 3, "disable_by_batch_size": 4096}
    llm = LLM(str(tiny_llama_path), speculative_config=spec, kv_cache_memory_gb=0.1,
              enable_prefix_caching=True)
    # one more token than counted: the verify step after the first token checks two
    params = [SamplingParams(max_tokens=DEPTH + 1, temperature=TEMPERATURE, seed=i,
                             allowed_token_ids=ALPHABET, ignore_eos=True)
              for i in range(NUM_SAMPLES)]
    outputs = llm.generate([{"prompt_token_ids": PROMPT}] * NUM_SAMPLES, params,
                           use_tqdm=False)
    stats = llm.llm_engine.core.get_stats()
    assert stats.spec_num_accepted_tokens > NUM_SAMPLES // 4  # runs were really accepted
    assert stats.spec_num_draft_tokens > stats.spec_num_accepted_tokens  # and rejected
    counts = Counter(tuple(o.outputs[0].token_ids[:DEPTH]) for o in outputs)
    assert sum(counts.values()) == NUM_SAMPLES
    # pool categories expected fewer than 5 times (the chi-square approximation needs it)
    statistic, pooled_obs, pooled_exp, df = 0.0, 0, 0.0, -1
    for seq, p in joint.items():
        expected = p * NUM_SAMPLES
        if expected < 5:
            pooled_obs += counts.get(seq, 0)
            pooled_exp += expected
            continue
        statistic += (counts.get(seq, 0) - expected) ** 2 / expected
        df += 1
    if pooled_exp > 0:
        statistic += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        df += 1
    assert df >= 3, f"too few categories: {joint}"
    assert statistic < chi_square_critical(df), (statistic, df, counts, joint)
    assert_core_clean(llm.llm_engine.core)
