"""Logprobs of chosen tokens plus the top-k alternatives, in vLLM's tensor layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class LogprobsTensors:
    """Per-position logprobs: column 0 is the chosen token, columns 1..k the top-k, descending."""

    token_ids: torch.Tensor  # [N, k+1] int64
    logprobs: torch.Tensor  # [N, k+1] float32
    ranks: torch.Tensor  # [N] int64, rank of the chosen token (1 = most likely)


def gather_logprobs(logprobs: torch.Tensor, k: int, token_ids: torch.Tensor) -> LogprobsTensors:
    """Pick the logprob and rank of `token_ids` and the top-k of each row of `logprobs`.

    Ties share the best rank: rank = 1 + number of tokens strictly more likely.
    """
    k = min(k, logprobs.shape[-1])
    token_ids = token_ids.long()
    chosen = logprobs.gather(-1, token_ids.unsqueeze(-1))  # [N, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # [N]
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # [N, k] each, descending
    return LogprobsTensors(
        token_ids=torch.cat([token_ids.unsqueeze(-1), top_ids], dim=-1),  # [N, k+1]
        logprobs=torch.cat([chosen, top_logprobs], dim=-1),  # [N, k+1]
        ranks=ranks,
    )


def compute_prompt_logprobs(
    logits: torch.Tensor, target_ids: torch.Tensor, k: int
) -> LogprobsTensors:
    """Logprobs of each prompt token (`target_ids[i]` is predicted by `logits[i]`), raw logits."""
    logprobs = logits.float().log_softmax(dim=-1)  # [P, V]
    return gather_logprobs(logprobs, k, target_ids)
