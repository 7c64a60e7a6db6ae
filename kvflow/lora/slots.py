"""Adapter weights in preallocated slots, and the batched LoRA op over a mixed batch.

Each LoRA'd projection of each layer owns one `LoRASlots`: room for `max_loras` adapters at
`max_lora_rank`, allocated once. Loading an adapter into a slot copies into that room (it
never reallocates, so the C decode layer's pointers stay valid); smaller ranks and untargeted
parts stay zero. A fused projection (qkv, gate+up) stacks its parts:

    a [S, parts * R, K]   shrink: part i uses rows i R .. i R + r_i
    b [S, parts * R, N]   expand, rank-major and block-diagonal: rows i R .. i R + r_i feed
                          only the columns of part i

The op (Punica's idea, no merging into base weights): the base projection runs once for the
whole batch, then each slot's tokens get (x aᵀ) b added, computed per slot group: two
matmuls in torch (the zero blocks of b cost a little arithmetic, not extra calls), or one C
call that skips them.
"""

from __future__ import annotations

import itertools

import torch

from kvflow.model import cpu_kernels
from kvflow.model.layers import LoRAMapping


class LoRASlots:
    """The slot weights of one (possibly fused) projection, and its batched op."""

    def __init__(self, num_slots: int, max_rank: int, in_features: int, part_sizes: list[int],
                 dtype: torch.dtype, device: torch.device) -> None:
        self.max_rank = max_rank
        self.part_sizes = list(part_sizes)
        self.offsets = [0, *itertools.accumulate(part_sizes)]
        self.a = torch.zeros(num_slots, len(part_sizes) * max_rank, in_features, dtype=dtype,
                             device=device)
        self.b = torch.zeros(num_slots, len(part_sizes) * max_rank, self.offsets[-1], dtype=dtype,
                             device=device)
        self.use_c = (device.type == "cpu" and dtype == torch.float32
                      and cpu_kernels.load() is not None)

    def load(self, slot: int, parts: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Fill one slot with an adapter's (A [r, K], scaled B [N_i, r]) per part, None where
        the adapter does not target that part."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        for i, pair in enumerate(parts):
            if pair is None:
                continue
            a, b = pair
            rank = a.shape[0]
            self.a[slot, i * self.max_rank:i * self.max_rank + rank].copy_(a)
            rows = slice(i * self.max_rank, i * self.max_rank + rank)
            self.b[slot, rows, self.offsets[i]:self.offsets[i + 1]].copy_(b.T)

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()

    def add_(self, out: torch.Tensor, x: torch.Tensor, mapping: LoRAMapping) -> None:
        """out [T, N] += (x [T, K] · A[s]ᵀ) · B[s]ᵀ for each token's slot s."""
        if self.use_c and out.dtype == x.dtype == torch.float32:  # one call for every slot
            # (level with torch's matmuls on one big group of a thousand tokens, 2-4x faster
            # on groups of a few dozen); a bfloat16 model's own ops take the torch path
            cpu_kernels.lora_add(out, x.contiguous(), mapping.token_slots, self.a, self.b,
                                 self.part_sizes)
            return
        same = x.dtype == self.a.dtype == out.dtype  # else lora_dtype differs from the model's
        for slot, rows in mapping.groups:
            shrunk = x[rows].to(self.a.dtype) @ self.a[slot].T  # [T_s, parts * R]
            if isinstance(rows, slice) and same:
                out[rows].addmm_(shrunk, self.b[slot])
            else:
                out.index_add_(0, _as_index(rows, out), (shrunk @ self.b[slot]).to(out.dtype))


def _as_index(rows: slice | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows
    return torch.arange(rows.start, rows.stop, device=like.device)


def build_mapping(slots: list[int], query_lens: list[int], device: torch.device
                  ) -> LoRAMapping | None:
    """The step's token → slot map from each request's slot (-1: none) and token count;
    None when no request of the step has an adapter."""
    if all(slot < 0 for slot in slots):
        return None
    token_slots = torch.repeat_interleave(torch.tensor(slots, dtype=torch.int64),
                                          torch.tensor(query_lens, dtype=torch.int64))
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for slot, length in zip(slots, query_lens, strict=True):
        if slot >= 0:
            spans = runs.setdefault(slot, [])
            if spans and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], start + length)  # adjacent: one contiguous run
            else:
                spans.append((start, start + length))
        start += length
    groups: list[tuple[int, slice | torch.Tensor]] = []
    for slot, spans in runs.items():
        if len(spans) == 1:
            groups.append((slot, slice(*spans[0])))
        else:
            index = torch.cat([torch.arange(a, b) for a, b in spans]).to(device)
            groups.append((slot, index))
    return LoRAMapping(token_slots.to(device), groups)
