"""Verifying proposals inside the target's ordinary forward pass.

A decode with proposals d1..dk runs k+1 tokens: its last known token t, then d1..dk. Each
of them is attended as its own single-token query over the context up to itself, so the
step takes the same decode kernels as one token does (the C whole-layer path on a CPU),
with the same arithmetic per token:

    flat batch   [ r0 chunk | r1: t d1 d2 d3 | r2: t ]
    attention    [ r0 chunk | 1  1  1  1     | 1    ]   query lengths
    seq lens     [  ...     | L  L+1 L+2 L+3 | M    ]   (L = r1's length with t)

Every layer writes all K/V of the step before it attends, so d2's query sees d1's key.
Position j's logits predict the token after d1..dj. Each position is sampled as a row of
its own whose history includes d1..dj (penalties, bad words and min_tokens see the
earlier proposals as if they had been accepted), then the run is accepted while the
sampled token equals the proposal:

    emitted = s0, s1, ..., sm   where m is the first j with s_j != d_{j+1} (or k)

Greedy rows emit exactly what k+1 plain decode steps would. Random rows: both proposers
are deterministic (q is one-hot on d), so vLLM's rule (accept d with min(1, p(d)/q(d)) =
p(d), else draw from norm(max(0, p - q)) = p without d) is the same as drawing s ~ p and
accepting iff s == d: the emitted tokens follow the target's distribution exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvflow.core.scheduler import ScheduledRequest, StepResult
from kvflow.engine.protocol import LogprobsLists


def attention_rows(query_lens: Sequence[int], seq_lens: Sequence[int],
                   tables: Sequence[list[int]], num_drafts: Sequence[int]
                   ) -> tuple[list[int], list[int], list[list[int]]]:
    """Query lengths, sequence lengths and block tables with each verifying request split
    into single-token queries (requests without proposals stay as they are)."""
    if not any(num_drafts):
        return list(query_lens), list(seq_lens), list(tables)
    out_q: list[int] = []
    out_s: list[int] = []
    out_t: list[list[int]] = []
    for q, seq_len, table, n in zip(query_lens, seq_lens, tables, num_drafts, strict=True):
        if n == 0:
            out_q.append(q)
            out_s.append(seq_len)
            out_t.append(table)
            continue
        for j in range(q):
            out_q.append(1)
            out_s.append(seq_len - q + j + 1)
            out_t.append(table)
    return out_q, out_s, out_t


def accepted_run(sampled: Sequence[int], drafts: Sequence[int]) -> list[int]:
    """The tokens a verify step emits: sampled[j] while it equals drafts[j], then the
    first one that differs (or the one after the last proposal)."""
    for j, draft in enumerate(drafts):
        if sampled[j] != draft:
            return list(sampled[:j + 1])
    return list(sampled[:len(drafts) + 1])


def verified_result(scheduled: list[ScheduledRequest], positions: list[tuple[int, int]],
                     tokens: list[int], row_logprobs: list[LogprobsLists | None]) -> StepResult:
    """Per request: the first sampled token, the accepted run after it (verifying rows) and
    one logprobs row per emitted token."""
    sampled: list[int | None] = [None] * len(scheduled)
    spec_tokens: list[list[int]] | None = None
    logprobs: list[LogprobsLists | None] | None = None
    at = 0
    while at < len(positions):
        i = positions[at][0]
        drafts = scheduled[i].spec_token_ids
        run = accepted_run(tokens[at:at + len(drafts) + 1], drafts) if drafts else [tokens[at]]
        sampled[i] = run[0]
        if drafts:
            spec_tokens = spec_tokens or [[] for _ in scheduled]
            spec_tokens[i] = run[1:]
        lists = row_logprobs[at:at + len(run)]
        if lists[0] is not None:
            logprobs = logprobs or [None] * len(scheduled)
            logprobs[i] = LogprobsLists(
                [ids for r in lists if r for ids in r.token_ids],
                [lps for r in lists if r for lps in r.logprobs],
                [rank for r in lists if r for rank in r.ranks])
        at += len(drafts) + 1
    return StepResult(sampled, logprobs, spec_tokens=spec_tokens)
