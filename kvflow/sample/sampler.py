"""Turn a batch of logits into next tokens, each row following its own request's parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvflow.sample.logprobs import LogprobsTensors, compute_prompt_logprobs, gather_logprobs
from kvflow.sample.metadata import SamplingMetadata

__all__ = [
    "LogprobsTensors",
    "Sampler",
    "SamplerOutput",
    "apply_logit_controls",
    "apply_min_p",
    "apply_penalties",
    "apply_top_k_top_p",
    "compute_prompt_logprobs",
]

_NEG_INF = float("-inf")


@dataclass(slots=True)
class SamplerOutput:
    """The token chosen for each row, and logprobs when any row asked for them."""

    sampled_token_ids: torch.Tensor  # [B] int64
    logprobs: LogprobsTensors | None  # [B, max_num_logprobs + 1] tensors


class Sampler:
    """Batched sampler with per-row parameters; pure tensor code, runs on CPU or CUDA.

    Steps, in vLLM's order:
      1. logprobs from the RAW model logits (before controls, penalties, temperature and
         filtering; vLLM's default "raw_logprobs"): they report what the model predicted,
         independent of how this request chose to sample;
      2. logit controls: allowed_token_ids, logit_bias, bad_words, min_tokens;
      3. penalties: repetition (prompt + output), frequency and presence (output);
      4. greedy rows take the argmax; random rows divide by temperature, apply top-k, top-p,
         min-p (Hugging Face's order) and draw by inverse CDF, so a row that has its own
         generator gets a token that depends only on its logits and that generator.
    The input logits are never modified.
    """

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()  # [B, V]; no copy when already float32
        raw_logprobs = None
        if md.max_num_logprobs is not None:
            raw_logprobs = logits.log_softmax(dim=-1)  # [B, V]
        logits = apply_logit_controls(logits, md)
        logits = apply_penalties(logits, md)
        sampled = sample(logits, md)  # [B]
        logprobs = None
        if raw_logprobs is not None and md.max_num_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, md.max_num_logprobs, sampled)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)


def apply_logit_controls(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """allowed_token_ids, logit_bias, bad_words and min_tokens; returns a new tensor if any."""
    if md.no_logit_controls:
        return logits
    logits = logits.clone()  # [B, V]; the caller's tensor stays raw
    if md.allowed_token_ids_mask is not None:
        logits.masked_fill_(md.allowed_token_ids_mask, _NEG_INF)
    if md.logit_bias is not None:
        rows, token_ids, biases = md.logit_bias  # [N] each
        logits.index_put_((rows, token_ids), biases, accumulate=True)
    for cells in (md.bad_words, md.min_tokens):
        if cells is not None:
            logits.index_put_(cells, logits.new_tensor(_NEG_INF))
    return logits


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition, frequency and presence penalties (vLLM / OpenAI semantics).

    Each touches only the (row, token) cells the row has seen, in this order: repetition
    rescales the raw values, then frequency subtracts once per occurrence, then presence
    once per distinct token.
    """
    if md.no_penalties:
        return logits
    logits = logits.clone()  # [B, V]; the caller's tensor stays raw
    if md.repetition_penalties is not None:
        assert md.seen_cells is not None
        rows, ids = md.seen_cells  # [N] each
        values = logits[rows, ids]  # [N]
        penalty = md.repetition_penalties[rows]  # [N]
        # Push seen tokens towards "less likely" whatever their sign (HF / vLLM rule).
        logits[rows, ids] = torch.where(values > 0, values / penalty, values * penalty)
    if md.frequency_penalties is not None:
        assert md.output_cells is not None
        rows, ids = md.output_cells  # [N] each, repeats accumulate: count x penalty
        logits.index_put_((rows, ids), -md.frequency_penalties[rows], accumulate=True)
    if md.presence_penalties is not None:
        assert md.output_seen_cells is not None
        rows, ids = md.output_seen_cells  # [N] each
        logits.index_put_((rows, ids), -md.presence_penalties[rows], accumulate=True)
    return logits


def sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Greedy rows: argmax. Random rows: temperature, top-k, top-p, min-p, then a draw."""
    if md.all_greedy:
        return logits.argmax(dim=-1)  # [B]
    random_ids = _sample_random(logits, md)  # [B]
    if md.all_random:
        return random_ids
    assert md.is_greedy is not None
    return torch.where(md.is_greedy, logits.argmax(dim=-1), random_ids)  # [B]


# Random rows are filtered and drawn this many at a time: each block builds a few [rows, V]
# float32 and float64 temporaries (about 36 bytes per vocabulary entry per row), so a wide
# step's working memory stays that of 8 rows.
_RANDOM_BLOCK_ROWS = 8


def _sample_random(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    assert md.temperature is not None
    uniform = _uniforms(logits.shape[0], md, logits.device)  # [B], drawn for the whole batch
    ids = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)  # [B]
    for first in range(0, logits.shape[0], _RANDOM_BLOCK_ROWS):
        rows = slice(first, first + _RANDOM_BLOCK_ROWS)
        block = logits[rows] / md.temperature[rows].unsqueeze(1)  # [b, V]
        block = apply_top_k_top_p(block, _rows(md.top_k, rows), _rows(md.top_p, rows),
                                  md.max_top_k)
        if md.min_p is not None:
            block = apply_min_p(block, md.min_p[rows])
        ids[rows] = _draw(block.softmax(dim=-1), uniform[rows])
    return ids


def _rows(values: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if values is None else values[rows]


def _uniforms(num_rows: int, md: SamplingMetadata, device: torch.device) -> torch.Tensor:
    """One uniform in [0, 1) per row, float64. A seeded row's comes from its own generator,
    so its token depends only on its probabilities and that generator, whatever else is in
    the batch."""
    uniform = torch.empty(num_rows, dtype=torch.float64, device=device)  # [B]
    if md.default_rng_rows is None:
        return uniform.uniform_()
    uniform.fill_(0.5)  # greedy rows: their draw is discarded
    if md.default_rng_rows.numel():
        uniform[md.default_rng_rows] = torch.rand(
            md.default_rng_rows.numel(), dtype=torch.float64, device=device)
    for row, generator in md.generators.items():
        uniform[row] = torch.rand(1, generator=generator, dtype=torch.float64, device=device)[0]
    return uniform


def _draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: each row's uniform found in the row's cumulative mass.

    One draw per row (not one per vocabulary entry, as an exponential race needs) is ~20x
    cheaper on a CPU; the cumulative sum is float64 so even the last of 49k entries keeps
    its probability.
    """
    vocab_size = probs.shape[1]
    cdf = probs.double().cumsum(dim=-1)  # [B, V]
    target = (uniform * cdf[:, -1]).unsqueeze(1)  # [B, 1], below the row's total mass
    # right=True: the first entry whose cumulative mass exceeds the target; a token of zero
    # probability adds no mass, so it can never be that entry.
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=vocab_size - 1)


# top-p first looks among this many of a row's most likely tokens (a partial topk, about
# 20x cheaper than sorting a 49k vocabulary on a CPU), then among 16x as many for rows whose
# nucleus did not fit; only rows still undecided fall back to the full sort.
_TOP_P_CANDIDATES = 256


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None, max_top_k: int
) -> torch.Tensor:
    """Keep each row's top_k tokens, then the smallest set reaching top_p of what is left."""
    if top_p is None:
        return logits if top_k is None else _apply_top_k_only(logits, top_k, max_top_k)
    vocab_size = logits.shape[1]
    width = max(_TOP_P_CANDIDATES, max_top_k)
    if width >= vocab_size:
        return _top_k_top_p_sorted(logits, top_k, top_p)
    kept, resolved = _top_k_top_p_among_best(logits, top_k, top_p, width)
    if bool(resolved.all()):
        return kept
    rest = (~resolved).nonzero().flatten()  # [R]
    rest_top_k = None if top_k is None else top_k[rest]
    wider = 16 * width
    if wider < vocab_size:  # a flatter row: try its 4096 best before sorting everything
        kept_rest, resolved_rest = _top_k_top_p_among_best(logits[rest], rest_top_k, top_p[rest],
                                                           wider)
        kept[rest] = kept_rest
        rest, rest_top_k = rest[~resolved_rest], (None if rest_top_k is None
                                                  else rest_top_k[~resolved_rest])
    if rest.numel():
        kept[rest] = _top_k_top_p_sorted(logits[rest], rest_top_k, top_p[rest])
    return kept


def _top_k_top_p_among_best(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """top-k/top-p decided among each row's `width` best tokens.

    Returns the filtered logits and a [B] bool telling which rows this decided: those whose
    top_k fits in `width`, or whose `width` best tokens already hold top_p of the mass.
    """
    values, ids = logits.topk(width, dim=-1)  # [B, W] each, descending
    log_total = logits.logsumexp(dim=-1)  # [B], the whole row's mass
    resolved = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)  # [B]
    if top_k is not None:
        within = top_k <= width  # [B]: these rows renormalize over their top_k only
        ranks = torch.arange(width, device=logits.device)  # [W]
        values = values.masked_fill(within.unsqueeze(1) & (ranks >= top_k.unsqueeze(1)),
                                    _NEG_INF)
        log_total = torch.where(within, values.logsumexp(dim=-1), log_total)
        resolved |= within
    probs = (values - log_total.unsqueeze(1)).exp()  # [B, W]
    cumulative = probs.cumsum(dim=-1)  # [B, W]
    resolved |= cumulative[:, -1] >= top_p
    # Keep a token while the mass strictly above it is below top_p (the best always stays).
    keep = (cumulative - probs < top_p.unsqueeze(1)) & (values > _NEG_INF)  # [B, W]
    kept = torch.full_like(logits, _NEG_INF)
    return kept.scatter_(1, ids, values.masked_fill(~keep, _NEG_INF)), resolved


def _top_k_top_p_sorted(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor
) -> torch.Tensor:
    vocab_size = logits.shape[1]
    sorted_logits, sorted_ids = logits.sort(dim=-1)  # [B, V] each, ascending
    if top_k is not None:
        kth_largest = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))  # [B, 1]
        sorted_logits.masked_fill_(sorted_logits < kth_largest, _NEG_INF)
    # Ascending cumulative mass: a token goes when it and everything below it fit in 1 - p,
    # i.e. the tokens above it already hold at least p.
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    drop = cumulative <= (1.0 - top_p).unsqueeze(1)  # [B, V]
    drop[:, -1] = False  # the most likely token always stays
    sorted_logits.masked_fill_(drop, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)  # [B, V]


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """top-k without a full sort: one topk(max_top_k) gives every row's threshold."""
    vocab_size = logits.shape[1]
    disabled = top_k >= vocab_size  # [B]
    k = top_k.masked_fill(disabled, 1)  # [B], a valid column for disabled rows
    top_values = logits.topk(max_top_k, dim=-1).values  # [B, max_top_k], descending
    kth_largest = top_values.gather(1, (k - 1).unsqueeze(1))  # [B, 1]
    kth_largest.masked_fill_(disabled.unsqueeze(1), _NEG_INF)
    return logits.masked_fill(logits < kth_largest, _NEG_INF)  # [B, V]


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than min_p times the row's most likely token."""
    probs = logits.softmax(dim=-1)  # [B, V]
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)  # [B, 1]
    return logits.masked_fill(probs < threshold, _NEG_INF)  # [B, V]
