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
         min-p (Hugging Face's order) and draw with exponential noise, so a row that has its own
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
    """Repetition, frequency and presence penalties (vLLM / OpenAI semantics)."""
    if md.no_penalties:
        return logits
    assert md.output_token_ids is not None
    num_rows, vocab_size = logits.shape
    output_counts = _bin_counts(md.output_token_ids, num_rows, vocab_size)  # [B, V] float
    in_output = output_counts > 0  # [B, V]
    if md.repetition_penalties is not None:
        assert md.prompt_token_ids is not None
        in_prompt = _bin_counts(md.prompt_token_ids, num_rows, vocab_size) > 0  # [B, V]
        penalty = md.repetition_penalties.unsqueeze(1)  # [B, 1]
        # Push seen tokens towards "less likely" whatever their sign (HF / vLLM rule).
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)  # [B, V]
        logits = torch.where(in_prompt | in_output, penalised, logits)
    if md.frequency_penalties is not None:
        logits = logits - md.frequency_penalties.unsqueeze(1) * output_counts  # [B, V]
    if md.presence_penalties is not None:
        logits = logits - md.presence_penalties.unsqueeze(1) * in_output  # [B, V]
    return logits


def _bin_counts(token_ids: torch.Tensor, num_rows: int, vocab_size: int) -> torch.Tensor:
    """Occurrences of each token id per row; padding (id = V) falls in a dropped last bucket."""
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.float32))
    return counts[:, :vocab_size]  # [B, V]


def sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Greedy rows: argmax. Random rows: temperature, top-k, top-p, min-p, then a draw."""
    if md.all_greedy:
        return logits.argmax(dim=-1)  # [B]
    random_ids = _sample_random(logits, md)  # [B]
    if md.all_random:
        return random_ids
    assert md.is_greedy is not None
    return torch.where(md.is_greedy, logits.argmax(dim=-1), random_ids)  # [B]


def _sample_random(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    assert md.temperature is not None
    logits = logits / md.temperature.unsqueeze(1)  # [B, V]
    logits = apply_top_k_top_p(logits, md.top_k, md.top_p, md.max_top_k)
    if md.min_p is not None:
        logits = apply_min_p(logits, md.min_p)
    probs = logits.softmax(dim=-1)  # [B, V]
    # Exponential race: argmax(p_i / q_i) with q_i ~ Exp(1) picks token i with probability p_i,
    # and each row's draw uses only that row's noise.
    return (probs / _exponential_noise(probs, md)).argmax(dim=-1)  # [B]


def _exponential_noise(probs: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Exp(1) noise like `probs`; seeded rows from their own generator, the rest share one draw."""
    if md.default_rng_rows is None:
        noise = torch.empty_like(probs).exponential_()  # [B, V]
    else:
        noise = torch.ones_like(probs)  # [B, V]; greedy rows draw nothing
        if md.default_rng_rows.numel():
            noise[md.default_rng_rows] = torch.empty(
                md.default_rng_rows.numel(), probs.shape[1], device=probs.device
            ).exponential_()  # [R, V]
        for row, generator in md.generators.items():
            noise[row].exponential_(generator=generator)  # [V], a view of the row
    # A zero draw would make 0/0 = nan for an impossible token, and argmax favours nan.
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None, max_top_k: int
) -> torch.Tensor:
    """Keep each row's top_k tokens, then the smallest set reaching top_p of what is left."""
    if top_p is None:
        return logits if top_k is None else _apply_top_k_only(logits, top_k, max_top_k)
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
