"""Who proposes what after each step: the engine core's hook into speculative decoding."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvflow.spec_decode.config import SpeculativeConfig
from kvflow.spec_decode.ngram import propose_ngram

if TYPE_CHECKING:
    from kvflow.core.request import Request
    from kvflow.core.scheduler import SchedulerOutput, StepResult
    from kvflow.spec_decode.draft import DraftModel

# A request whose acceptance average fell below the configured rate proposes only every
# PROBE_EVERY tokens, so it can recover when its output starts copying again.
PROBE_EVERY = 8
# Whether speculating pays is measured, not assumed: per decode batch size (in powers of
# two), the output rate (tokens a second of step time, the proposing included) of steps with
# and without proposals. Each kind is timed this many times, then the faster one runs,
RATE_SAMPLES = 3
# and after EXPLORE_EVERY steps the other kind runs EXPLORE_STEPS steps, to follow a change
# (longer contexts, other text, other load). Each time it loses again the wait doubles, up
# to EXPLORE_MAX: trying costs, most of all a draft model's catching up.
EXPLORE_EVERY = 32
EXPLORE_MAX = 1024
EXPLORE_STEPS = 3
RATE_EMA = 0.25  # weight of a new step in a rate's moving average


class StepRates:
    """Output tokens a second of pure decode steps, with and without proposals, per batch
    size bucket. A draft model that costs more than its accepted tokens save (many requests,
    or proposals that fail) turns speculation off there; proposals that land keep it on."""

    def __init__(self) -> None:
        self.rates: dict[tuple[int, bool], float] = {}
        self.samples: dict[tuple[int, bool], int] = {}
        self.steps: dict[int, int] = {}  # steps since the faster kind was last questioned
        self.wait: dict[int, int] = {}  # steps before the slower kind runs again
        self.winner: dict[int, bool] = {}

    @staticmethod
    def bucket(batch: int) -> int:
        """1, 2, 4, 8, ...: the power of two at or above the batch size."""
        return 1 << max(batch - 1, 0).bit_length()

    def record(self, batch: int, speculated: bool, tokens: int, seconds: float) -> None:
        """One step's rate; the first few of a kind count by their best (a cold start, a
        draft catching up on a whole prompt), then a moving average."""
        key = (self.bucket(batch), speculated)
        rate = tokens / max(seconds, 1e-9)
        old = self.rates.get(key)
        count = self.samples.get(key, 0)
        if old is None:
            self.rates[key] = rate
        elif count < RATE_SAMPLES:
            self.rates[key] = max(old, rate)
        else:
            self.rates[key] = (1 - RATE_EMA) * old + RATE_EMA * rate
        self.samples[key] = count + 1

    def speculate(self, batch: int) -> bool:
        """Whether the next step at this batch size should carry proposals."""
        b = self.bucket(batch)
        for kind in (True, False):
            if self.samples.get((b, kind), 0) < RATE_SAMPLES:
                return kind
        faster = self.rates[(b, True)] >= self.rates[(b, False)]
        step = self.steps.get(b, 0) + 1
        wait = self.wait.get(b, EXPLORE_EVERY)
        if step > wait + EXPLORE_STEPS:  # a round of the slower kind is over: judge it
            won_again = self.winner.get(b, faster) == faster
            wait = self.wait[b] = min(2 * wait, EXPLORE_MAX) if won_again else EXPLORE_EVERY
            self.winner[b] = faster
            step = 1
        self.steps[b] = step
        return not faster if step > wait else faster


class Proposer:
    """Sets `spec_token_ids` of the running requests worth speculating on."""

    def __init__(self, config: SpeculativeConfig, draft: DraftModel | None = None) -> None:
        self.config = config
        self.draft = draft
        self.rates = StepRates()
        self._propose_s = 0.0  # time the proposals of the next step took
        self._speculated = False  # whether the last decode step carried proposals

    def observe(self, out: SchedulerOutput, result: StepResult, seconds: float) -> None:
        """Time one step took (`seconds`, the model's); pure decode steps feed the rates."""
        scheduled = out.scheduled
        propose_s, self._propose_s = self._propose_s, 0.0
        if not scheduled or any(s.num_new_tokens - len(s.spec_token_ids) != 1
                                for s in scheduled):
            self._speculated = False
            return
        extra = result.spec_tokens or []
        tokens = sum(1 + (len(extra[i]) if extra else 0)
                     for i, token in enumerate(result.sampled) if token is not None)
        speculated = any(s.spec_token_ids for s in scheduled)
        # the first step with proposals after one without is not timed: a draft model
        # first catches up on the tokens it missed, a cost of switching, not of speculating
        if not speculated or self._speculated:
            self.rates.record(len(scheduled), speculated, tokens, seconds + propose_s)
        self._speculated = speculated

    def propose(self, running: Sequence[Request]) -> None:
        config = self.config
        for request in running:
            request.spec_token_ids = []
        if len(running) > config.disable_by_batch_size:
            return  # a step this wide is not bound by reading the weights
        chosen = [r for r in running if self._wanted(r)]
        if not chosen or not self.rates.speculate(len(running)):
            return
        start = time.perf_counter()
        self._propose(chosen)
        self._propose_s = time.perf_counter() - start

    def _propose(self, chosen: list[Request]) -> None:
        config = self.config
        if self.draft is not None:
            self.draft.propose(chosen, config.num_speculative_tokens)
            return
        k = config.num_speculative_tokens
        for request in chosen:
            # fewer proposals where few are accepted: a rejected one still costs its row
            wanted = min(k, 1 + math.ceil(request.spec_acceptance * k))
            request.spec_token_ids = propose_ngram(
                request.all_token_ids, wanted, config.prompt_lookup_min,
                config.prompt_lookup_max)

    def _wanted(self, request: Request) -> bool:
        """Decodes only (a prefill chunk or a recompute is no place for proposals), not
        under a grammar (its matcher advances one sampled token at a time), with room for
        at least one more token, and not while its proposals keep failing (but probes)."""
        if request.num_computed_tokens != request.num_tokens - 1 or request.grammar is not None:
            return False
        if request.num_output_tokens + 1 >= request.max_tokens \
                or request.num_tokens + 1 >= request.max_model_len:
            return False
        return (request.spec_acceptance >= self.config.min_acceptance_rate
                or request.num_output_tokens % PROBE_EVERY == 0)
