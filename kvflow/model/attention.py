"""Paged attention over a block-table KV cache: pure torch (CPU and CUDA), the CPU's C kernel
or the Triton kernels (CUDA's default, kvflow.model.triton_attention).

Each layer owns one preallocated cache tensor (index 0 = K, 1 = V):

    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]

Seen as a flat array of `num_blocks * block_size` slots, position p of a request lives in
slot `block_table[p // block_size] * block_size + p % block_size`. With block_size 4 and
block_table [7, 2]:

    position   0  1  2  3 | 4  5  6  7
    slot      28 29 30 31 | 8  9 10 11

A step's new tokens of all requests arrive flattened in request order (no padding). Request
i has `query_lens[i]` new tokens at positions `seq_lens[i] - query_lens[i] .. seq_lens[i] - 1`:

    flat batch  [ r0 prefill chunk | r1 decode | r2 decode | r3 prefill ]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvflow.model import cpu_kernels
from kvflow.model.layers import LoRAMapping
from kvflow.model.triton_attention import (
    PagedKernelMetadata,
    build_kernel_metadata,
    paged_attention_triton,
)


def kv_cache_shape(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
) -> tuple[int, int, int, int, int]:
    """Shape of one layer's KV cache tensor."""
    return (2, num_blocks, block_size, num_kv_heads, head_dim)


def kv_cache_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one block costs across all layers (K and V)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size


@dataclass(slots=True)
class PrefillSpan:
    """One request with more than one new token, attended on its own."""

    start: int  # first index of its tokens in the flat batch
    end: int  # one past its last index
    # Slots of all its positions 0..seq_len-1 and the causal mask of the new tokens over
    # them; both None when it has no earlier context, so the fresh K/V suffice.
    context_slots: torch.Tensor | None  # [seq_len]
    mask: torch.Tensor | None  # [query_len, seq_len] bool, True = attend


@dataclass(slots=True)
class DecodeGroup:
    """Single-token queries of similar context length, attended in one batched call.

    Their blocks are gathered into one padded [G, NB * block_size] context; grouping by
    length keeps that padding (copied, then zeroed) small when lengths differ widely.
    """

    token_indices: torch.Tensor  # [G] index in the flat batch
    seq_lens: torch.Tensor  # [G] context length of each, the new token included
    blocks: torch.Tensor  # [G, NB] block ids, padded with 0
    mask: torch.Tensor | None  # [G, NB * bs] True = attend; None when nothing is padding
    padding_rows: torch.Tensor | None  # [P] rows of the gathered [G * NB * bs] context to zero


@dataclass(slots=True)
class AttentionMetadata:
    """Where a step's new tokens go in the KV cache and what each of them attends to."""

    num_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    prefills: list[PrefillSpan]
    decodes: list[DecodeGroup]  # requests with a single new token
    # Decodes go to the C kernel of kvflow.model.cpu_kernels (one group, nothing gathered).
    cpu_kernel: bool = False
    # Each token's LoRA adapter slot, when any token of the step has one. It rides here
    # because this is the one per-step object every layer already receives.
    lora: LoRAMapping | None = None
    # The block-table view for the Triton kernels; when set, prefills and decodes are empty
    # and every token is attended by those kernels (kvflow.model.triton_attention).
    kernel: PagedKernelMetadata | None = None

    @property
    def decode_token_indices(self) -> torch.Tensor | None:
        """[num_decodes] flat-batch index of every decode token, group by group."""
        if not self.decodes:
            return None
        return torch.cat([group.token_indices for group in self.decodes])


def _padded_block_table(block_tables: list[list[int]]) -> torch.Tensor:
    width = max((len(table) for table in block_tables), default=0)
    rows = [table + [0] * (width - len(table)) for table in block_tables]
    return torch.tensor(rows, dtype=torch.long).reshape(len(block_tables), width)


def _slots(table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each position given its request's block-table row(s)."""
    return table.gather(-1, positions // block_size) * block_size + positions % block_size


def _check_inputs(
    query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int
) -> None:
    if not len(query_lens) == len(seq_lens) == len(block_tables):
        raise ValueError("query_lens, seq_lens and block_tables must have one entry per request")
    for i, (query_len, seq_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        if not 1 <= query_len <= seq_len:
            raise ValueError(f"request {i}: need 1 <= query_len {query_len} <= seq_len {seq_len}")
        if len(block_tables[i]) * block_size < seq_len:
            raise ValueError(f"request {i}: block table too short for {seq_len} tokens")


def build_attention_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
    cpu_kernel: bool = False,
    paged_kernel: bool = False,
) -> AttentionMetadata:
    """Precompute slots and masks once per step; every layer reuses them.

    With `cpu_kernel` all decodes form one group for the C kernel, which reads each
    request's blocks in place up to its length (no padding to mask or zero). With
    `paged_kernel` the Triton kernels read every request's blocks in place instead.
    """
    _check_inputs(query_lens, seq_lens, block_tables, block_size)
    num_requests = len(query_lens)
    table = _padded_block_table(block_tables)  # [num_requests, max_blocks]
    query_lens_t = torch.tensor(query_lens, dtype=torch.long)  # [num_requests]
    context_lens_t = torch.tensor(seq_lens, dtype=torch.long) - query_lens_t  # [num_requests]
    starts_t = torch.cumsum(query_lens_t, 0) - query_lens_t  # [num_requests]
    num_tokens = int(query_lens_t.sum())

    # Position of every new token, then its slot through its request's block-table row.
    request_of_token = torch.repeat_interleave(torch.arange(num_requests), query_lens_t)  # [T]
    offset_in_request = torch.arange(num_tokens) - starts_t[request_of_token]  # [T]
    positions = context_lens_t[request_of_token] + offset_in_request  # [T]
    slot_mapping = _slots(table[request_of_token], positions[:, None], block_size)[:, 0]  # [T]
    if paged_kernel:
        kernel = build_kernel_metadata(table, query_lens_t, context_lens_t + query_lens_t,
                                       starts_t, device)
        return AttentionMetadata(num_tokens, slot_mapping.to(device), [], [], kernel=kernel)

    starts = starts_t.tolist()
    prefills = [
        _prefill_span(table[i], starts[i], query_lens[i], seq_lens[i], block_size, device)
        for i in range(num_requests)
        if query_lens[i] > 1
    ]
    decodes = [i for i in range(num_requests) if query_lens[i] == 1]
    if cpu_kernel:
        groups = [_decode_group(table, starts_t, decodes, seq_lens, block_size, device,
                                padded=False)] if decodes else []
    else:
        groups = [
            _decode_group(table, starts_t, members, seq_lens, block_size, device)
            for members in group_by_length(decodes, seq_lens, block_size)
        ]
    return AttentionMetadata(num_tokens, slot_mapping.to(device), prefills, groups, cpu_kernel)


# A decode joins the current (longer) group while it needs at least this share of the
# group's blocks, so at most ~25% of a group's gathered context is padding.
_GROUP_FILL = 0.75


def group_by_length(
    decodes: list[int], seq_lens: list[int], block_size: int
) -> list[list[int]]:
    """Split decode requests, longest first, into groups of similar block counts."""
    groups: list[list[int]] = []
    width = 0
    for i in sorted(decodes, key=lambda i: seq_lens[i], reverse=True):
        num_blocks = -(-seq_lens[i] // block_size)
        if not groups or num_blocks < _GROUP_FILL * width:
            groups.append([])
            width = num_blocks
        groups[-1].append(i)
    return groups


def _decode_group(
    table: torch.Tensor,
    starts: torch.Tensor,
    members: list[int],
    seq_lens: list[int],
    block_size: int,
    device: torch.device,
    padded: bool = True,
) -> DecodeGroup:
    ids = torch.tensor(members, dtype=torch.long)  # [G]
    lens = torch.tensor([seq_lens[i] for i in members], dtype=torch.long)  # [G]
    num_blocks = -(-int(lens.max()) // block_size)
    width = num_blocks * block_size
    # Whole blocks are gathered (contiguous block_size * KvH * hd runs, far cheaper than
    # slot by slot); positions past a request's length are masked out and zeroed.
    mask = padding_rows = None
    if padded and int(lens.min()) < width:
        context = torch.arange(width)  # [L]
        mask = context[None, :] < lens[:, None]  # [G, L]
        padding_rows = (~mask).flatten().nonzero().flatten().to(device)  # [P]
        mask = mask.to(device)
    return DecodeGroup(starts[ids].to(device), lens.to(device),
                       table[ids, :num_blocks].contiguous().to(device), mask, padding_rows)


def _prefill_span(
    table_row: torch.Tensor,
    start: int,
    query_len: int,
    seq_len: int,
    block_size: int,
    device: torch.device,
) -> PrefillSpan:
    context_len = seq_len - query_len
    if context_len == 0:
        return PrefillSpan(start, start + query_len, None, None)
    context_slots = _slots(table_row, torch.arange(seq_len), block_size)  # [S]
    # New token j sits at position context_len + j and sees positions 0..context_len + j.
    query_positions = context_len + torch.arange(query_len)  # [Q]
    mask = torch.arange(seq_len)[None, :] <= query_positions[:, None]  # [Q, S]
    return PrefillSpan(start, start + query_len, context_slots.to(device), mask.to(device))


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    cache_written: bool = False,
) -> torch.Tensor:
    """Write the new K/V into the cache (unless the caller did), then attend causally within
    each request.

    query [T, num_heads, head_dim], key/value [T, num_kv_heads, head_dim] (rotary applied);
    returns [T, num_heads, head_dim].
    """
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    key_cache = kv_cache[0].view(-1, num_kv_heads, head_dim)  # [num_slots, KvH, hd]
    value_cache = kv_cache[1].view(-1, num_kv_heads, head_dim)  # [num_slots, KvH, hd]
    if not cache_written:
        key_cache.index_copy_(0, metadata.slot_mapping, key.to(key_cache.dtype))
        value_cache.index_copy_(0, metadata.slot_mapping, value.to(value_cache.dtype))
    if metadata.kernel is not None:
        return paged_attention_triton(query, kv_cache, metadata.kernel, scale)  # [T, H, hd]

    if metadata.cpu_kernel and not metadata.prefills and len(metadata.decodes) == 1:
        # Decodes only, one group in token order: no gather, no scatter.
        group = metadata.decodes[0]
        return cpu_kernels.paged_decode_attention(query, kv_cache, group.blocks,
                                                  group.seq_lens, scale)  # [T, H, hd]
    output = torch.empty_like(query)  # [T, H, hd]
    for span in metadata.prefills:
        output[span.start : span.end] = _prefill_attention(
            query, key, value, key_cache, value_cache, span, scale
        )
    for group in metadata.decodes:
        if metadata.cpu_kernel:
            decoded = cpu_kernels.paged_decode_attention(
                query.index_select(0, group.token_indices), kv_cache, group.blocks,
                group.seq_lens, scale)  # [G, H, hd]
        else:
            decoded = _decode_attention(query, kv_cache, group, scale)  # [G, H, hd]
        output.index_copy_(0, group.token_indices, decoded)
    return output


def _prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    span: PrefillSpan,
    scale: float,
) -> torch.Tensor:
    # 4-D [1, heads, tokens, hd]: torch's CPU flash-attention kernel takes only batched
    # inputs; 3-D ones fall to the math path, 3.5x slower at 512 tokens here.
    q = query[span.start : span.end].transpose(0, 1)[None]  # [1, H, Q, hd]
    if span.context_slots is None:
        k = key[span.start : span.end].transpose(0, 1)[None]  # [1, KvH, Q, hd]
        v = value[span.start : span.end].transpose(0, 1)[None]  # [1, KvH, Q, hd]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        # (a bfloat16 cache read by float32 activations: see LlamaModel.activation_dtype)
        k = key_cache[span.context_slots].to(q.dtype).transpose(0, 1)[None]  # [1, KvH, S, hd]
        v = value_cache[span.context_slots].to(q.dtype).transpose(0, 1)[None]  # [1, KvH, S, hd]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=span.mask, scale=scale, enable_gqa=True
        )  # [1, H, Q, hd]
    return out[0].transpose(0, 1)  # [Q, H, hd]


def _decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    group: DecodeGroup,
    scale: float,
) -> torch.Tensor:
    """A group's single-token queries in one batched call over their gathered context."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    num_decodes, num_blocks = group.blocks.shape
    length = num_blocks * kv_cache.shape[2]
    q = query.index_select(0, group.token_indices)  # [G, H, hd]
    flat_blocks = group.blocks.flatten()  # [G * NB]
    k = kv_cache[0].index_select(0, flat_blocks)  # [G * NB, bs, KvH, hd]
    v = kv_cache[1].index_select(0, flat_blocks)  # [G * NB, bs, KvH, hd]
    if group.padding_rows is not None:
        # Padding slots hold stale values of other requests; zero them (in these gathered
        # copies) so that even a NaN left there can never leak into this request's output.
        k.view(num_decodes * length, -1).index_fill_(0, group.padding_rows, 0.0)
        v.view(num_decodes * length, -1).index_fill_(0, group.padding_rows, 0.0)
    k = k.view(num_decodes, length, num_kv_heads, head_dim).transpose(1, 2)  # [G, KvH, L, hd]
    v = v.view(num_decodes, length, num_kv_heads, head_dim).transpose(1, 2)  # [G, KvH, L, hd]
    mask = None if group.mask is None else group.mask[:, None, None, :]  # [G, 1, 1, L]
    # One fused kernel (flash attention on CPU) per group; GQA without expanding K/V.
    out = F.scaled_dot_product_attention(
        q.view(num_decodes, num_heads, 1, head_dim), k.to(q.dtype), v.to(q.dtype),
        attn_mask=mask, scale=scale, enable_gqa=True,
    )  # [G, H, 1, hd]
    return out.reshape(num_decodes, num_heads, head_dim)
