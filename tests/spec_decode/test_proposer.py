"""When speculation runs: the measured rates of steps with and without proposals."""

from __future__ import annotations

from kvflow.spec_decode.proposer import (
    EXPLORE_EVERY,
    EXPLORE_STEPS,
    RATE_SAMPLES,
    StepRates,
)


def run(rates: StepRates, batch: int, steps: int, spec_rate: float, plain_rate: float
        ) -> list[bool]:
    """`steps` decisions, each step recorded at the rate of the kind chosen."""
    kinds = []
    for _ in range(steps):
        kind = rates.speculate(batch)
        rates.record(batch, kind, 10, 10 / (spec_rate if kind else plain_rate))
        kinds.append(kind)
    return kinds


def test_buckets_are_powers_of_two() -> None:
    assert [StepRates.bucket(b) for b in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


def test_each_kind_is_timed_then_the_faster_runs() -> None:
    rates = StepRates()
    kinds = run(rates, 8, 2 * RATE_SAMPLES + EXPLORE_EVERY - 1, spec_rate=50, plain_rate=100)
    assert kinds[:RATE_SAMPLES] == [True] * RATE_SAMPLES
    assert kinds[RATE_SAMPLES:2 * RATE_SAMPLES] == [False] * RATE_SAMPLES
    assert not any(kinds[2 * RATE_SAMPLES:])  # proposals cost more than they save
    # the same bucket: 5..8 running requests share what was measured
    assert run(rates, 5, 1, spec_rate=50, plain_rate=100) == [False]
    # another bucket starts over
    assert run(StepRates(), 1, 1, spec_rate=200, plain_rate=100) == [True]


def test_the_slower_kind_is_retried_less_often_while_it_keeps_losing() -> None:
    rates = StepRates()
    run(rates, 1, 2 * RATE_SAMPLES, spec_rate=200, plain_rate=100)
    kinds = run(rates, 1, 400, spec_rate=200, plain_rate=100)
    plain = [i for i, kind in enumerate(kinds) if not kind]
    # rounds of EXPLORE_STEPS plain steps after 32, 64, then 128 speculating steps
    starts = [i for i in plain if i - 1 not in plain]
    assert all(plain.count(s) for s in starts) and len(plain) == EXPLORE_STEPS * len(starts)
    gaps = [b - a - EXPLORE_STEPS for a, b in zip(starts, starts[1:], strict=False)]
    assert starts[0] == EXPLORE_EVERY and gaps == [2 * EXPLORE_EVERY, 4 * EXPLORE_EVERY]
    assert len(kinds) - starts[-1] < 8 * EXPLORE_EVERY


def test_a_change_is_followed() -> None:
    rates = StepRates()
    run(rates, 2, 2 * RATE_SAMPLES + 10, spec_rate=200, plain_rate=100)
    # proposals stop landing: speculating falls behind once the average catches up
    kinds = run(rates, 2, 40, spec_rate=40, plain_rate=100)
    assert sum(kinds[-20:]) <= EXPLORE_STEPS  # (a round of proposals may fall in there)
    # and come back: the next round of the slower kind finds it faster again
    kinds = run(rates, 2, 200, spec_rate=300, plain_rate=100)
    assert all(kinds[-20:])


def test_the_step_after_one_without_proposals_is_not_timed() -> None:
    """A draft's first step with proposals includes catching up on what it missed."""
    from types import SimpleNamespace

    from kvflow.core.scheduler import StepResult
    from kvflow.spec_decode.config import SpeculativeConfig
    from kvflow.spec_decode.proposer import Proposer

    proposer = Proposer(SpeculativeConfig("ngram", 3, 2, 3))

    def step(drafts: list[int], accepted: list[int]) -> None:
        out = SimpleNamespace(scheduled=[SimpleNamespace(num_new_tokens=1 + len(drafts),
                                                         spec_token_ids=drafts)])
        result = StepResult([7], spec_tokens=[accepted] if drafts else None)
        proposer.observe(out, result, 0.5)  # type: ignore[arg-type]

    step([], [])
    assert proposer.rates.samples == {(1, False): 1} and proposer.rates.rates[(1, False)] == 2
    step([5, 6, 7], [5, 6])  # the first with proposals after one without: not timed
    assert (1, True) not in proposer.rates.samples
    step([5, 6, 7], [5, 6, 7])  # 1 + 3 tokens in 0.5 s
    assert proposer.rates.rates[(1, True)] == 8
    # a prefill chunk in the step: not a decode step, nothing timed
    out = SimpleNamespace(scheduled=[SimpleNamespace(num_new_tokens=40, spec_token_ids=[])])
    proposer.observe(out, StepResult([None]), 0.5)  # type: ignore[arg-type]
    assert proposer.rates.samples == {(1, False): 1, (1, True): 1}
