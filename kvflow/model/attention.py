"""Paged attention over a block-table KV cache, in pure torch so one path serves CPU and CUDA.

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
class AttentionMetadata:
    """Where a step's new tokens go in the KV cache and what each of them attends to."""

    num_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    prefills: list[PrefillSpan]
    # Requests with a single new token, batched together; None when there are none.
    decode_token_indices: torch.Tensor | None  # [num_decodes] index in the flat batch
    decode_blocks: torch.Tensor | None  # [num_decodes, max_blocks] block ids, padded with 0
    decode_mask: torch.Tensor | None  # [num_decodes, max_blocks * block_size] False on padding


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
) -> AttentionMetadata:
    """Precompute slots and masks once per step; every layer reuses them."""
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

    starts = starts_t.tolist()
    prefills = [
        _prefill_span(table[i], starts[i], query_lens[i], seq_lens[i], block_size, device)
        for i in range(num_requests)
        if query_lens[i] > 1
    ]
    decodes = [i for i in range(num_requests) if query_lens[i] == 1]
    decode_token_indices = decode_blocks = decode_mask = None
    if decodes:
        decode_ids = torch.tensor(decodes, dtype=torch.long)  # [D]
        decode_seq_lens = torch.tensor([seq_lens[i] for i in decodes])  # [D]
        max_blocks = -(-int(decode_seq_lens.max()) // block_size)
        # Whole blocks are gathered (contiguous block_size * KvH * hd runs, far cheaper
        # than slot by slot); positions past a request's length are masked out.
        decode_blocks = table[decode_ids, :max_blocks].to(device)  # [D, NB]
        context = torch.arange(max_blocks * block_size)  # [NB * bs]
        decode_mask = (context[None, :] < decode_seq_lens[:, None]).to(device)  # [D, NB * bs]
        decode_token_indices = starts_t[decode_ids].to(device)  # [D]
    return AttentionMetadata(
        num_tokens=num_tokens,
        slot_mapping=slot_mapping.to(device),
        prefills=prefills,
        decode_token_indices=decode_token_indices,
        decode_blocks=decode_blocks,
        decode_mask=decode_mask,
    )


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
) -> torch.Tensor:
    """Write the new K/V into the cache, then attend causally within each request.

    query [T, num_heads, head_dim], key/value [T, num_kv_heads, head_dim] (rotary applied);
    returns [T, num_heads, head_dim].
    """
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    key_cache = kv_cache[0].view(-1, num_kv_heads, head_dim)  # [num_slots, KvH, hd]
    value_cache = kv_cache[1].view(-1, num_kv_heads, head_dim)  # [num_slots, KvH, hd]
    key_cache.index_copy_(0, metadata.slot_mapping, key)
    value_cache.index_copy_(0, metadata.slot_mapping, value)

    output = torch.empty_like(query)  # [T, H, hd]
    for span in metadata.prefills:
        output[span.start : span.end] = _prefill_attention(
            query, key, value, key_cache, value_cache, span, scale
        )
    if metadata.decode_token_indices is not None:
        decoded = _decode_attention(query, kv_cache, metadata, scale)  # [D, H, hd]
        output.index_copy_(0, metadata.decode_token_indices, decoded)
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
    q = query[span.start : span.end].transpose(0, 1)  # [H, Q, hd]
    if span.context_slots is None:
        k = key[span.start : span.end].transpose(0, 1)  # [KvH, Q, hd]
        v = value[span.start : span.end].transpose(0, 1)  # [KvH, Q, hd]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        k = key_cache[span.context_slots].transpose(0, 1)  # [KvH, S, hd]
        v = value_cache[span.context_slots].transpose(0, 1)  # [KvH, S, hd]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=span.mask, scale=scale, enable_gqa=True
        )  # [H, Q, hd]
    return out.transpose(0, 1)  # [Q, H, hd]


def _decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """All single-token queries in one batched call over their gathered, padded context."""
    assert metadata.decode_token_indices is not None
    assert metadata.decode_blocks is not None and metadata.decode_mask is not None
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    num_decodes, max_len = metadata.decode_mask.shape
    q = query.index_select(0, metadata.decode_token_indices)  # [D, H, hd]
    flat_blocks = metadata.decode_blocks.flatten()  # [D * NB]
    k = kv_cache[0].index_select(0, flat_blocks)  # [D * NB, bs, KvH, hd]
    v = kv_cache[1].index_select(0, flat_blocks)  # [D * NB, bs, KvH, hd]
    k = k.view(num_decodes, max_len, num_kv_heads, head_dim)  # [D, L, KvH, hd]
    v = v.view(num_decodes, max_len, num_kv_heads, head_dim)  # [D, L, KvH, hd]
    # Padding slots hold stale values of other requests; zero them (in these gathered
    # copies) so that even a NaN left there can never leak into this request's output.
    padding = ~metadata.decode_mask[:, :, None, None]  # [D, L, 1, 1]
    k.masked_fill_(padding, 0.0)
    v.masked_fill_(padding, 0.0)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # [D, KvH, L, hd]
    # One fused kernel (flash attention on CPU) over all decodes; GQA without expanding K/V.
    out = F.scaled_dot_product_attention(
        q.view(num_decodes, num_heads, 1, head_dim), k, v,
        attn_mask=metadata.decode_mask[:, None, None, :], scale=scale, enable_gqa=True,
    )  # [D, H, 1, hd]
    return out.reshape(num_decodes, num_heads, head_dim)
