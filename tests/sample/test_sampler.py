"""Sampler against plain per-row reference implementations written with Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from kvflow.sample.logprobs import compute_prompt_logprobs
from kvflow.sample.metadata import SamplingMetadata
from kvflow.sample.sampler import (
    Sampler,
    _top_k_top_p_sorted,
    apply_logit_controls,
    apply_penalties,
    apply_top_k_top_p,
)
from kvflow.sampling_params import SamplingParams

V = 32
CPU = torch.device("cpu")
NEG_INF = float("-inf")


def build(
    params: list[SamplingParams],
    prompts: list[list[int]],
    outputs: list[list[int]],
    generators: list[torch.Generator | None] | None = None,
    vocab_size: int = V,
    device: torch.device = CPU,
) -> SamplingMetadata:
    gens = generators if generators is not None else [None] * len(params)
    return SamplingMetadata.build(params, prompts, outputs, gens, vocab_size, device)


def reference_row(
    row: list[float], p: SamplingParams, prompt: list[int], output: list[int]
) -> list[float]:
    """Controls then penalties for one row, token by token, as the spec reads."""
    row = list(row)
    vocab = range(len(row))
    if p.allowed_token_ids is not None:
        row = [x if t in p.allowed_token_ids else NEG_INF for t, x in enumerate(row)]
    for t, bias in (p.logit_bias or {}).items():
        row[t] += bias
    for word in p.bad_words_token_ids or []:
        prefix = word[:-1]
        if not prefix or output[-len(prefix):] == prefix:
            row[word[-1]] = NEG_INF
    if len(output) < p.min_tokens:
        for t in p.all_stop_token_ids:
            row[t] = NEG_INF
    r = p.repetition_penalty
    for t in set(prompt) | set(output):
        row[t] = row[t] / r if row[t] > 0 else row[t] * r
    for t in vocab:
        row[t] -= p.frequency_penalty * output.count(t)
        row[t] -= p.presence_penalty * (t in output)
    return row


def histories(num_rows: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, V, (5 + 3 * i,), generator=g).tolist() for i in range(num_rows)]
    # Few distinct ids so counts above 1 occur; row lengths differ to exercise padding.
    outputs = [torch.randint(0, 8, (2 * i,), generator=g).tolist() for i in range(num_rows)]
    return prompts, outputs


def check_against_reference(params: list[SamplingParams], seed: int = 0) -> None:
    prompts, outputs = histories(len(params), seed)
    logits = torch.randn(len(params), V, generator=torch.Generator().manual_seed(seed)) * 3
    md = build(params, prompts, outputs)
    got = apply_penalties(apply_logit_controls(logits, md), md)
    want = torch.tensor(
        [reference_row(r, p, pr, o) for r, p, pr, o in zip(logits.tolist(), params, prompts,
                                                          outputs, strict=True)]
    )
    torch.testing.assert_close(got, want)
    # The greedy token is the argmax of the processed logits.
    greedy = [p.clone() for p in params]
    for p in greedy:
        p.temperature = 0.0
    sampled = Sampler()(logits, build(greedy, prompts, outputs)).sampled_token_ids
    assert sampled.tolist() == want.argmax(dim=-1).tolist()


def with_bad_words(words: list[list[int]]) -> SamplingParams:
    p = SamplingParams()
    p.bad_words_token_ids = words
    return p


def with_stop_ids(min_tokens: int, stop_ids: set[int]) -> SamplingParams:
    p = SamplingParams(min_tokens=min_tokens)
    p.all_stop_token_ids = set(stop_ids)
    return p


SINGLE_FEATURE = {
    "repetition_up": lambda i: SamplingParams(repetition_penalty=1.1 + 0.3 * i),
    "repetition_down": lambda i: SamplingParams(repetition_penalty=0.5 + 0.1 * i),
    "frequency": lambda i: SamplingParams(frequency_penalty=0.7 - 0.6 * i),
    "presence": lambda i: SamplingParams(presence_penalty=1.5 - i),
    "logit_bias": lambda i: SamplingParams(logit_bias={i: 5.0, 7: -3.0 * i, 20 + i: 0.5}),
    "allowed_token_ids": lambda i: SamplingParams(allowed_token_ids=[i, 3, 17 + i]),
    "bad_words": lambda i: with_bad_words([[9], [i, 4], [2, 3, 30]]),
    "min_tokens": lambda i: with_stop_ids(3, {0, 31 - i}),
}


@pytest.mark.parametrize("feature", sorted(SINGLE_FEATURE))
def test_each_control_and_penalty_matches_reference(feature: str) -> None:
    params = [SINGLE_FEATURE[feature](i) for i in range(3)]
    for seed in range(3):
        check_against_reference(params, seed)


def test_mixed_batch_matches_reference() -> None:
    """One batch where every row asks for something different, features overlapping."""
    everything = SamplingParams(
        repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=-0.5,
        logit_bias={1: 2.0, 2: -1.0}, min_tokens=10, stop_token_ids=[5],
    )  # fmt: skip
    everything.bad_words_token_ids = [[6], [3, 7]]
    params = [
        SamplingParams(),
        SamplingParams(repetition_penalty=0.8),
        everything,
        SamplingParams(presence_penalty=2.0, allowed_token_ids=list(range(0, V, 2))),
        with_bad_words([[4, 4, 4, 11]]),
        SamplingParams(frequency_penalty=-1.0, logit_bias={0: -100.0}),
    ]
    for seed in range(5):
        check_against_reference(params, seed)


def test_input_logits_are_not_modified() -> None:
    params = [SamplingParams(logit_bias={1: 3.0}, repetition_penalty=1.5, top_k=3, top_p=0.5)]
    logits = torch.randn(1, V)
    before = logits.clone()
    Sampler()(logits, build(params, [[1, 2]], [[3]]))
    assert torch.equal(logits, before)


# --- distributions ---------------------------------------------------------------------------

# Distinct logits, scrambled so that sorting matters; cumulative masses sit far from top_p.
SMALL_LOGITS = [0.5, -1.0, 2.0, -0.5, 1.0, -2.0, 1.5, 0.0]


def reference_probs(temperature: float, top_k: int, top_p: float, min_p: float) -> list[float]:
    """The exact distribution a random row samples from (HF order: top-k, top-p, min-p)."""
    scaled = [x / temperature for x in SMALL_LOGITS]
    order = sorted(range(len(scaled)), key=lambda t: -scaled[t])
    keep = set(order[:top_k]) if top_k else set(order)

    def normalised(kept: set[int]) -> list[float]:
        total = sum(math.exp(scaled[t]) for t in kept)
        return [math.exp(scaled[t]) / total if t in kept else 0.0 for t in range(len(scaled))]

    probs = normalised(keep)
    mass_above, nucleus = 0.0, set()
    for t in order:
        if t in keep and mass_above < top_p:
            nucleus.add(t)
            mass_above += probs[t]
    probs = normalised(nucleus)
    return normalised({t for t in nucleus if probs[t] >= min_p * max(probs)})


DISTRIBUTIONS = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=2.5),
    dict(top_k=3),
    dict(top_p=0.75),
    dict(min_p=0.3),
    dict(temperature=1.7, top_k=6, top_p=0.9, min_p=0.15),
]


@pytest.mark.parametrize("settings", DISTRIBUTIONS, ids=lambda s: str(s))
def test_random_sampling_distribution(settings: dict[str, float]) -> None:
    draws = 20_000
    params = [SamplingParams(**settings)] * draws  # type: ignore[arg-type]
    logits = torch.tensor([SMALL_LOGITS]).expand(draws, -1)  # [draws, 8]
    md = SamplingMetadata.build(params, [[]] * draws, [[]] * draws, [None] * draws, 8, CPU)
    torch.manual_seed(1234)  # fixed: the check is deterministic, it cannot flake
    tokens = Sampler()(logits, md).sampled_token_ids
    freq = torch.bincount(tokens, minlength=8).double() / draws
    want = torch.tensor(
        reference_probs(
            settings.get("temperature", 1.0),
            int(settings.get("top_k", 0)),
            settings.get("top_p", 1.0),
            settings.get("min_p", 0.0),
        ),
        dtype=torch.float64,
    )
    assert freq[want == 0].sum().item() == 0, "a filtered-out token was sampled"
    total_variation = 0.5 * (freq - want).abs().sum().item()
    assert total_variation < 0.02, (freq.tolist(), want.tolist())


def test_top_k_fast_path_matches_sort_path() -> None:
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(5))
    top_k = torch.tensor([1, 5, V, 31, 2, V])
    fast = apply_top_k_top_p(logits, top_k, None, max_top_k=31)
    sort = apply_top_k_top_p(logits, top_k, torch.ones(6), max_top_k=31)
    assert torch.equal(fast, sort)
    kept = (fast > NEG_INF).sum(dim=-1)
    assert kept.tolist() == [1, 5, V, 31, 2, V]


def test_greedy_is_argmax_and_uses_no_randomness() -> None:
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(9)
    gen_state = gen.get_state()
    rng_state = torch.get_rng_state()
    params = [SamplingParams(temperature=0.0, seed=9)] * 5
    md = build(params, [[]] * 5, [[]] * 5, generators=[gen, None, None, None, None])
    out = Sampler()(logits, md)
    assert out.sampled_token_ids.tolist() == logits.argmax(dim=-1).tolist()
    assert out.logprobs is None
    assert torch.equal(gen.get_state(), gen_state)
    assert torch.equal(torch.get_rng_state(), rng_state)


# --- seeds -----------------------------------------------------------------------------------


def run_seeded(companions: list[SamplingParams], steps: int = 25) -> list[int]:
    """Tokens of a seeded row (seed 77) that sits after `companions` in the batch."""
    target = SamplingParams(temperature=1.3, top_p=0.95, seed=77)
    gen = torch.Generator().manual_seed(77)
    other_gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None
                  for p in companions]
    tokens: list[int] = []
    logits_rng = torch.Generator().manual_seed(0)
    params = [*companions, target]
    n = len(params)
    for _ in range(steps):
        own_logits = torch.randn(1, V, generator=logits_rng)  # [1, V], same in every run
        other_logits = torch.randn(n - 1, V)  # [n-1, V], differs with the global seed
        logits = torch.cat([other_logits, own_logits])  # [n, V]
        md = build(params, [[1]] * n, [tokens] * n, generators=[*other_gens, gen])
        tokens.append(int(Sampler()(logits, md).sampled_token_ids[-1]))
    return tokens


def test_seeded_row_ignores_its_batch_companions() -> None:
    torch.manual_seed(0)
    alone = run_seeded([])
    torch.manual_seed(1)
    crowded = run_seeded([
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(seed=5, top_k=3),
        SamplingParams(top_p=0.5, min_p=0.1),
    ])  # fmt: skip
    torch.manual_seed(2)
    all_greedy_companions = run_seeded([SamplingParams(temperature=0.0)] * 3)
    assert alone == crowded == all_greedy_companions
    assert len(set(alone)) > 5  # really random, not a constant


# --- logprobs --------------------------------------------------------------------------------


def reference_rank(row: list[float], token: int) -> int:
    return 1 + sum(x > row[token] for x in row)


def test_logprobs_come_from_raw_logits() -> None:
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(3)) * 2
    params = [
        SamplingParams(logprobs=3, temperature=0.0, logit_bias={int(logits[0].argmin()): 100.0}),
        SamplingParams(logprobs=0, repetition_penalty=1.7, temperature=0.8),
        SamplingParams(temperature=0.5, top_k=2),  # no logprobs asked: computed anyway
        SamplingParams(logprobs=5, presence_penalty=1.0, top_p=0.5),
    ]
    prompts, outputs = histories(4, 1)
    out = Sampler()(logits, build(params, prompts, outputs))
    assert out.logprobs is not None
    raw = torch.log_softmax(logits, dim=-1)  # [B, V]
    sampled = out.sampled_token_ids
    assert sampled[0].item() == logits[0].argmin().item()  # the bias decided the token...
    assert out.logprobs.token_ids.shape == out.logprobs.logprobs.shape == (4, 6)
    assert out.logprobs.token_ids[:, 0].tolist() == sampled.tolist()
    for i in range(4):
        row = raw[i]
        torch.testing.assert_close(out.logprobs.logprobs[i, 0], row[sampled[i]])  # ...not this
        top = row.topk(5)
        assert out.logprobs.token_ids[i, 1:].tolist() == top.indices.tolist()
        torch.testing.assert_close(out.logprobs.logprobs[i, 1:], top.values)
        assert out.logprobs.ranks[i].item() == reference_rank(row.tolist(), int(sampled[i]))
    assert out.logprobs.ranks[0].item() == V


def test_prompt_logprobs() -> None:
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(4))
    targets = torch.tensor([3, 0, 31, 7, 7])
    lp = compute_prompt_logprobs(logits, targets, k=2)
    raw = torch.log_softmax(logits, dim=-1)
    assert lp.token_ids[:, 0].tolist() == targets.tolist()
    torch.testing.assert_close(lp.logprobs[:, 0], raw[torch.arange(5), targets])
    assert lp.token_ids[:, 1:].tolist() == raw.topk(2).indices.tolist()
    want_ranks = [reference_rank(raw[i].tolist(), int(targets[i])) for i in range(5)]
    assert lp.ranks.tolist() == want_ranks
    assert compute_prompt_logprobs(logits, targets, k=0).token_ids.shape == (5, 1)


# --- CUDA ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    cuda = torch.device("cuda")
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.2, logit_bias={3: 1.0}),
        SamplingParams(temperature=0.9, top_k=5, top_p=0.8, min_p=0.05, seed=3, logprobs=2),
        SamplingParams(frequency_penalty=0.5, allowed_token_ids=[1, 2, 3, 4]),
        SamplingParams(),
    ]
    params[0].bad_words_token_ids = [[7]]
    prompts, outputs = histories(4, 0)
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    md_cpu = build(params, prompts, outputs)
    md_gpu = build(params, prompts, outputs, device=cuda,
                   generators=[None, torch.Generator(cuda).manual_seed(3), None, None])
    processed = apply_penalties(apply_logit_controls(logits, md_cpu), md_cpu)
    processed_gpu = apply_penalties(apply_logit_controls(logits.to(cuda), md_gpu), md_gpu)
    torch.testing.assert_close(processed_gpu.cpu(), processed)
    out = Sampler()(logits.to(cuda), md_gpu)
    assert out.sampled_token_ids.device.type == "cuda"
    assert out.sampled_token_ids[0].item() == processed[0].argmax().item()
    assert out.sampled_token_ids[2].item() in {1, 2, 3, 4}
    assert out.logprobs is not None
    torch.testing.assert_close(out.logprobs.logprobs[:, 1:].cpu(),
                               torch.log_softmax(logits, -1).topk(2).values)


@pytest.mark.parametrize("vocab", [4096, 20000])
def test_top_p_candidate_path_matches_sort_path(vocab: int) -> None:
    """Peaked rows are decided among the best 256 tokens, wider ones among 4096 (when the
    vocabulary is larger), flat rows fall back to the sort."""
    generator = torch.Generator().manual_seed(7)
    scale = torch.tensor([8.0, 8.0, 0.1, 4.0, 8.0, 0.1])[:, None]  # 0.1: nucleus > 256 tokens
    logits = torch.randn(6, vocab, generator=generator) * scale
    top_p = torch.tensor([0.9, 0.5, 0.9, 0.99, 1.0, 0.3])
    top_ks = torch.tensor([vocab, 40, vocab, 300, 3, 1000])
    for top_k, max_top_k in [(None, 0), (top_ks, 1000)]:
        fast = apply_top_k_top_p(logits, top_k, top_p, max_top_k)
        sort = _top_k_top_p_sorted(logits, top_k, top_p)
        assert torch.equal(fast > NEG_INF, sort > NEG_INF)
        torch.testing.assert_close(fast[fast > NEG_INF], logits[fast > NEG_INF])
