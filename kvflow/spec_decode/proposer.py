"""Who proposes what after each step: the engine core's hook into speculative decoding."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvflow.spec_decode.config import SpeculativeConfig
from kvflow.spec_decode.ngram import propose_ngram

if TYPE_CHECKING:
    from kvflow.core.request import Request
    from kvflow.spec_decode.draft import DraftModel

# A request whose acceptance average fell below the configured rate proposes only every
# PROBE_EVERY tokens, so it can recover when its output starts copying again.
PROBE_EVERY = 8


class Proposer:
    """Sets `spec_token_ids` of the running requests worth speculating on."""

    def __init__(self, config: SpeculativeConfig, draft: DraftModel | None = None) -> None:
        self.config = config
        self.draft = draft

    def propose(self, running: Sequence[Request]) -> None:
        config = self.config
        if len(running) > config.disable_by_batch_size:
            for request in running:  # a step this wide is not bound by reading the weights
                request.spec_token_ids = []
            return
        chosen = [r for r in running if self._wanted(r)]
        for request in running:
            request.spec_token_ids = []
        if not chosen:
            return
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
