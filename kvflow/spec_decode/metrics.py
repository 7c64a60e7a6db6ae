"""Acceptance counts of speculative decoding, as vLLM reports them.

mean acceptance length = 1 + accepted / drafts (the target's own token counts, vLLM's
convention); per-position acceptance rate i = accepted at position i / drafts.
"""

from __future__ import annotations


class SpecDecodingStats:
    """Counters since start: verify steps with proposals, tokens proposed and accepted."""

    __slots__ = ("num_drafts", "num_draft_tokens", "num_accepted_tokens",
                 "num_accepted_tokens_per_pos")

    def __init__(self) -> None:
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_accepted_tokens_per_pos: list[int] = []

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        """One request's proposals verified: the first num_accepted of them were taken."""
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        per_pos = self.num_accepted_tokens_per_pos
        if len(per_pos) < num_accepted:
            per_pos.extend([0] * (num_accepted - len(per_pos)))
        for position in range(num_accepted):
            per_pos[position] += 1


def format_spec_stats(drafts: int, draft_tokens: int, accepted: int,
                      per_pos: list[int]) -> str:
    """The stats log's part for an interval (differences of the counters)."""
    if not drafts:
        return ""
    rates = ", ".join(f"{n / drafts:.2f}" for n in per_pos)
    return (f", spec decoding: mean acceptance length {1 + accepted / drafts:.2f}, "
            f"accepted {accepted}/{draft_tokens} draft tokens "
            f"({100 * accepted / max(draft_tokens, 1):.1f}%), per-position [{rates}]")
