"""Per-step batch tensors that tell the sampler what each row (one request) asks for."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import torch

from kvflow.sampling_params import SamplingParams, SamplingType

# A pair of equal-length index tensors naming (row, token id) cells of the logits.
CellIndex = tuple[torch.Tensor, torch.Tensor]


@dataclass(slots=True)
class SamplingMetadata:
    """Sampling settings of one batch, row i = request i; None means no row uses the feature."""

    vocab_size: int
    # --- how to pick the token ---
    all_greedy: bool
    all_random: bool
    is_greedy: torch.Tensor | None  # [B] bool; None when all_greedy or all_random
    temperature: torch.Tensor | None  # [B] float32, 1.0 on greedy rows; None when all_greedy
    top_k: torch.Tensor | None  # [B] int64 in [1, V], V where disabled
    max_top_k: int  # largest top_k below V in the batch (0 when top_k is None)
    top_p: torch.Tensor | None  # [B] float32, 1.0 where disabled
    min_p: torch.Tensor | None  # [B] float32, 0.0 where disabled
    generators: dict[int, torch.Generator]  # row -> its own generator (random rows only)
    # Rows whose noise comes from the default generator. None: every row does (the common
    # all-random, unseeded batch, drawn in one call); may be empty.
    default_rng_rows: torch.Tensor | None  # [R] int64
    # --- logprobs, from the raw logits ---
    max_num_logprobs: int | None  # the batch's largest `logprobs`; rows slice their own k
    # --- penalties ---
    # Token histories as (row, id) cells, so a penalty touches only what a row has seen
    # instead of dense [B, V] counts and masks rebuilt every step.
    seen_cells: CellIndex | None  # distinct cells of prompt + output (repetition only)
    output_cells: CellIndex | None  # every output token, repeats kept (frequency)
    output_seen_cells: CellIndex | None  # distinct cells of the output (presence)
    repetition_penalties: torch.Tensor | None  # [B] float32, 1.0 where disabled
    frequency_penalties: torch.Tensor | None  # [B] float32
    presence_penalties: torch.Tensor | None  # [B] float32
    # --- logit controls ---
    allowed_token_ids_mask: torch.Tensor | None  # [B, V] bool, True where NOT allowed
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, ids, biases [N]
    bad_words: CellIndex | None  # cells a banned word would complete this step
    min_tokens: CellIndex | None  # stop-token cells of rows still short of min_tokens

    @property
    def no_top_k(self) -> bool:
        return self.top_k is None

    @property
    def no_top_p(self) -> bool:
        return self.top_p is None

    @property
    def no_min_p(self) -> bool:
        return self.min_p is None

    @property
    def no_penalties(self) -> bool:
        return (
            self.repetition_penalties is None
            and self.frequency_penalties is None
            and self.presence_penalties is None
        )

    @property
    def no_logit_controls(self) -> bool:
        return (
            self.allowed_token_ids_mask is None
            and self.logit_bias is None
            and self.bad_words is None
            and self.min_tokens is None
        )

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        vocab_size: int,
        device: torch.device,
    ) -> SamplingMetadata:
        """Gather the batch's settings into tensors on `device`; raises ValueError on bad ids."""
        if not len(params) == len(prompt_token_ids) == len(output_token_ids) == len(generators):
            raise ValueError("params, token id lists and generators must have one entry per row")
        for p in params:
            validate_token_ids(p, vocab_size)
        greedy = [p.sampling_type == SamplingType.GREEDY for p in params]
        rep, freq, pres = _penalty_tensors(params, device)
        logit_bias, allowed = _bias_and_allowed(params, vocab_size, device)
        return cls(
            vocab_size=vocab_size,
            **_mode_fields(params, greedy, generators, vocab_size, device),
            max_num_logprobs=max(
                (p.logprobs for p in params if p.logprobs is not None), default=None
            ),
            **_history_cells(prompt_token_ids, output_token_ids, rep is not None,
                             freq is not None, pres is not None, vocab_size, device),
            repetition_penalties=rep,
            frequency_penalties=freq,
            presence_penalties=pres,
            allowed_token_ids_mask=allowed,
            logit_bias=logit_bias,
            bad_words=_bad_word_cells(params, output_token_ids, vocab_size, device),
            min_tokens=_min_tokens_cells(params, output_token_ids, vocab_size, device),
        )


def validate_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """Reject logit_bias / allowed_token_ids naming ids outside the vocabulary.

    The engine should call this when it admits a request, so a bad request fails alone
    instead of failing a whole batch in `SamplingMetadata.build`.
    """
    for name, ids in (
        ("logit_bias", params.logit_bias or {}),
        ("allowed_token_ids", params.allowed_token_ids or []),
    ):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name} names token ids outside [0, {vocab_size}): {bad[:5]}")


class _ModeFields(TypedDict):
    all_greedy: bool
    all_random: bool
    is_greedy: torch.Tensor | None
    temperature: torch.Tensor | None
    top_k: torch.Tensor | None
    max_top_k: int
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    generators: dict[int, torch.Generator]
    default_rng_rows: torch.Tensor | None


def _mode_fields(
    params: Sequence[SamplingParams],
    greedy: list[bool],
    generators: Sequence[torch.Generator | None],
    vocab_size: int,
    device: torch.device,
) -> _ModeFields:
    """Greedy/random split, temperature, top-k/top-p/min-p and noise sources."""
    all_greedy, all_random = all(greedy), not any(greedy)
    fields = _ModeFields(
        all_greedy=all_greedy, all_random=all_random, is_greedy=None, temperature=None,
        top_k=None, max_top_k=0, top_p=None, min_p=None, generators={}, default_rng_rows=None,
    )
    if all_greedy:
        return fields
    if not all_random:
        fields["is_greedy"] = torch.tensor(greedy, dtype=torch.bool, device=device)
    random_rows = [i for i, g in enumerate(greedy) if not g]
    # Greedy rows get neutral values: they are sampled along and then discarded.
    temperatures = [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]
    fields["temperature"] = _floats(temperatures, device)
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    if any(top_k[i] < vocab_size for i in random_rows):
        fields["top_k"] = torch.tensor(top_k, dtype=torch.int64, device=device)
        fields["max_top_k"] = max(k for k in top_k if k < vocab_size)
    if any(params[i].top_p < 1.0 for i in random_rows):
        fields["top_p"] = _floats([p.top_p for p in params], device)
    if any(params[i].min_p > 0.0 for i in random_rows):
        fields["min_p"] = _floats([p.min_p for p in params], device)
    seeded = {i: g for i in random_rows if (g := generators[i]) is not None}
    fields["generators"] = seeded
    if not all_random or seeded:
        rows = [i for i in random_rows if i not in seeded]
        fields["default_rng_rows"] = torch.tensor(rows, dtype=torch.int64, device=device)
    return fields


def _penalty_tensors(
    params: Sequence[SamplingParams], device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    rep = [p.repetition_penalty for p in params]
    freq = [p.frequency_penalty for p in params]
    pres = [p.presence_penalty for p in params]
    return (
        _floats(rep, device) if any(r != 1.0 for r in rep) else None,
        _floats(freq, device) if any(freq) else None,
        _floats(pres, device) if any(pres) else None,
    )


def _bias_and_allowed(
    params: Sequence[SamplingParams], vocab_size: int, device: torch.device
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
    rows, ids, biases = [], [], []
    for i, p in enumerate(params):
        for token_id, bias in (p.logit_bias or {}).items():
            rows.append(i)
            ids.append(token_id)
            biases.append(bias)
    logit_bias = None
    if rows:
        logit_bias = (_longs(rows, device), _longs(ids, device), _floats(biases, device))
    allowed = None
    if any(p.allowed_token_ids is not None for p in params):
        allowed = torch.zeros(len(params), vocab_size, dtype=torch.bool)  # [B, V]
        for i, p in enumerate(params):
            if p.allowed_token_ids is not None:
                allowed[i] = True
                allowed[i, p.allowed_token_ids] = False
        allowed = allowed.to(device)
    return logit_bias, allowed


def _bad_word_cells(
    params: Sequence[SamplingParams],
    output_token_ids: Sequence[Sequence[int]],
    vocab_size: int,
    device: torch.device,
) -> CellIndex | None:
    """Last tokens of banned words whose other tokens the output currently ends with."""
    rows: list[int] = []
    ids: list[int] = []
    for i, (p, output) in enumerate(zip(params, output_token_ids, strict=True)):
        for word in p.bad_words_token_ids or ():
            if not word or not 0 <= word[-1] < vocab_size:
                continue
            prefix = word[:-1]
            if len(prefix) > len(output):
                continue
            if not prefix or list(output[len(output) - len(prefix):]) == list(prefix):
                rows.append(i)
                ids.append(word[-1])
    return (_longs(rows, device), _longs(ids, device)) if rows else None


def _min_tokens_cells(
    params: Sequence[SamplingParams],
    output_token_ids: Sequence[Sequence[int]],
    vocab_size: int,
    device: torch.device,
) -> CellIndex | None:
    """Stop token ids (EOS included, whatever ignore_eos says) of rows below min_tokens."""
    rows: list[int] = []
    ids: list[int] = []
    for i, (p, output) in enumerate(zip(params, output_token_ids, strict=True)):
        if len(output) < p.min_tokens:
            stops = [t for t in p.all_stop_token_ids if 0 <= t < vocab_size]
            rows.extend([i] * len(stops))
            ids.extend(stops)
    return (_longs(rows, device), _longs(ids, device)) if rows else None


class _HistoryCells(TypedDict):
    seen_cells: CellIndex | None
    output_cells: CellIndex | None
    output_seen_cells: CellIndex | None


def _history_cells(
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    repetition: bool,
    frequency: bool,
    presence: bool,
    vocab_size: int,
    device: torch.device,
) -> _HistoryCells:
    """The (row, token id) cells each penalty needs, flattened with numpy."""
    cells = _HistoryCells(seen_cells=None, output_cells=None, output_seen_cells=None)
    if not (repetition or frequency or presence):
        return cells
    out_rows, out_ids = _flatten(output_token_ids)
    out_keys = out_rows * vocab_size + out_ids
    if frequency:
        cells["output_cells"] = _to_cells(out_keys, vocab_size, device)
    if presence:
        cells["output_seen_cells"] = _to_cells(np.unique(out_keys), vocab_size, device)
    if repetition:
        prompt_rows, prompt_ids = _flatten(prompt_token_ids)
        keys = np.unique(np.concatenate([prompt_rows * vocab_size + prompt_ids, out_keys]))
        cells["seen_cells"] = _to_cells(keys, vocab_size, device)
    return cells


def _flatten(token_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Row index and token id of every entry, each [N] int64."""
    lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(token_ids))
    ids = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64,
                      count=int(lengths.sum()))
    return np.repeat(np.arange(len(token_ids), dtype=np.int64), lengths), ids


def _to_cells(keys: np.ndarray, vocab_size: int, device: torch.device) -> CellIndex:
    """row * V + id keys → (rows, ids) tensors."""
    keys_t = torch.from_numpy(keys)
    return (keys_t // vocab_size).to(device), (keys_t % vocab_size).to(device)


def _floats(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _longs(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)
