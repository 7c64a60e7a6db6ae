"""Triton kernels of paged attention; imported only through kvflow.model.triton_attention.

Both kernels read K/V in place from one layer's cache, whose K (or V) half is

    cache: [num_blocks, block_size, num_kv_heads, head_dim]

Key position n of a request lives in block `block_table[n // block_size]`, row
`n % block_size`. A tile of BLOCK_N positions may span several blocks: its rows are gathered
through the table (each block's rows are contiguous), so block_size need not be a power of
two nor match BLOCK_N. Positions past a request's length are never loaded (their K/V read as
0), so stale values or NaNs in unused slots cannot reach an output.

GQA: one program serves one KV head and all query heads of its group, so each K/V tile is
loaded once per group. Scores live in the base-2 domain (scale folded with log2(e)); the
running max, the sum and the accumulator are float32.

Under TRITON_INTERPRET=1, tl.dot of bfloat16 operands is wrong (numpy has no bfloat16 and
the interpreter multiplies the raw bits), so UPCAST turns the loaded tiles to float32 first.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Finite stand-in for -inf as the running max: exp2(m_old - m_new) stays finite even when a
# tile (or a whole split-K partition) has no visible key.
_NO_MAX = tl.constexpr(-1.0e30)


@triton.jit
def _load_kv_tile(cache_ptr, table_row_ptr, n, n_ok, kv_head, d, d_ok, block_size,
                  stride_block, stride_row, stride_head, UPCAST: tl.constexpr):
    """K or V of positions n [BLOCK_N] of one KV head, transposed: [HEAD_PAD, BLOCK_N]."""
    block = tl.load(table_row_ptr + n // block_size, mask=n_ok, other=0).to(tl.int64)
    rows = block * stride_block + (n % block_size) * stride_row + kv_head * stride_head
    tile = tl.load(cache_ptr + rows[None, :] + d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                   other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, token_indices_ptr,
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    qk_scale, window, block_size, num_heads, num_partitions,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_block, stride_row, stride_head, stride_table,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One decode query's heads of one KV group over one partition of its context.

    grid (num_decodes, num_kv_heads, num_partitions). Without SPLIT the one partition covers
    the whole context and the normalized output is stored; with SPLIT each partition stores
    its unnormalized accumulator, max and sum for paged_decode_reduce_kernel.
    """
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    token = tl.load(token_indices_ptr + req).to(tl.int64)
    g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + g  # [GROUP_PAD]
    g_ok = g < GROUP
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + token * stride_q_tok + heads[:, None] * stride_q_head + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [GROUP_PAD, HEAD_PAD]
    q = q.to(k_cache_ptr.dtype.element_ty)  # the cache's dtype, if activations differ
    if UPCAST:
        q = q.to(tl.float32)
    # The query sits at position seq_len - 1 and sees [lo, seq_len).
    lo = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    start = part * PARTITION
    end = tl.minimum(start + PARTITION, seq_len)
    first = tl.maximum(start, lo // BLOCK_N * BLOCK_N)
    table_row = block_tables_ptr + req.to(tl.int64) * stride_table
    m_i = tl.full([GROUP_PAD], _NO_MAX, tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
    for n0 in range(first, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        n_ok = (n < end) & (n >= lo)
        k = _load_kv_tile(k_cache_ptr, table_row, n, n_ok, kv_head, d, d_ok, block_size,
                          stride_block, stride_row, stride_head, UPCAST)  # [HEAD_PAD, BLOCK_N]
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [GROUP_PAD, BLOCK_N]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [GROUP_PAD, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(v_cache_ptr, table_row, n, n_ok, kv_head, d, d_ok, block_size,
                          stride_block, stride_row, stride_head, UPCAST)  # [HEAD_PAD, BLOCK_N]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), tl.trans(v),
                                            input_precision=PRECISION)
        m_i = m_new
    if SPLIT:
        # partials: acc [D, H, P, HEAD_PAD], max and sum [D, H, P]
        row = (req.to(tl.int64) * num_heads + heads) * num_partitions + part  # [GROUP_PAD]
        tl.store(part_acc_ptr + row[:, None] * HEAD_PAD + d[None, :], acc,
                 mask=g_ok[:, None])
        tl.store(part_max_ptr + row, m_i, mask=g_ok)
        tl.store(part_sum_ptr + row, l_i, mask=g_ok)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + token * stride_o_tok + heads[:, None] * stride_o_head + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def paged_decode_reduce_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr, token_indices_ptr, out_ptr,
    num_heads, num_partitions, stride_o_tok, stride_o_head,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, PART_PAD: tl.constexpr,
):
    """Combine one query head's split-K partials: grid (num_decodes, num_heads).

    out = sum_p 2^(m_p - M) acc_p / sum_p 2^(m_p - M) l_p, M the largest partition max.
    """
    req = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(token_indices_ptr + req).to(tl.int64)
    p = tl.arange(0, PART_PAD)
    p_ok = p < num_partitions
    row = (req.to(tl.int64) * num_heads + head) * num_partitions + p  # [PART_PAD]
    m = tl.load(part_max_ptr + row, mask=p_ok, other=_NO_MAX)
    l_p = tl.load(part_sum_ptr + row, mask=p_ok, other=0.0)
    weight = tl.exp2(m - tl.max(m, 0))  # [PART_PAD]
    denom = tl.sum(weight * l_p, 0)
    d = tl.arange(0, HEAD_PAD)
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_PAD + d[None, :], mask=p_ok[:, None],
                  other=0.0)  # [PART_PAD, HEAD_PAD]
    out = tl.sum(acc * weight[:, None], 0) / tl.where(denom > 0, denom, 1.0)  # [HEAD_PAD]
    tl.store(out_ptr + token * stride_o_tok + head * stride_o_head + d,
             out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_starts_ptr,
    query_lens_ptr, out_ptr,
    qk_scale, window, block_size,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_block, stride_row, stride_head, stride_table,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Causal attention of a tile of one request's new tokens over its whole paged context.

    grid (num_prefills, query tiles, num_kv_heads). The tile's BLOCK_M rows are
    TOKENS = BLOCK_M // GROUP tokens times the GROUP query heads of one KV head:

        row r -> token t0 + r // GROUP, head kv_head * GROUP + r % GROUP

    The new tokens' K/V are already in the cache (written before the call), so earlier
    chunks, prefix-cache hits and this chunk are all read from it: new token j sits at
    position context_len + j and sees positions [lo, context_len + j].
    """
    req = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    seq_len = tl.load(seq_lens_ptr + req)
    query_len = tl.load(query_lens_ptr + req)
    q_start = tl.load(query_starts_ptr + req).to(tl.int64)
    context_len = seq_len - query_len
    t0 = tile * TOKENS
    r = tl.arange(0, BLOCK_M)
    tok = t0 + r // GROUP  # [BLOCK_M]
    heads = kv_head * GROUP + r % GROUP  # [BLOCK_M]
    row_ok = (tok < query_len) & (r < TOKENS * GROUP)
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_q_tok
                + heads[:, None] * stride_q_head + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, HEAD_PAD]
    q = q.to(k_cache_ptr.dtype.element_ty)  # the cache's dtype, if activations differ
    if UPCAST:
        q = q.to(tl.float32)
    pos = context_len + tok  # [BLOCK_M]
    # Keys up to the tile's last token; none for a tile past the request's tokens.
    hi = tl.where(t0 < query_len, tl.minimum(seq_len, context_len + t0 + TOKENS), 0)
    first = tl.where(window > 0, tl.maximum(context_len + t0 - window + 1, 0), 0)
    first = first // BLOCK_N * BLOCK_N
    table_row = block_tables_ptr + req.to(tl.int64) * stride_table
    m_i = tl.full([BLOCK_M], _NO_MAX, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    for n0 in range(first, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        n_ok = n < hi
        k = _load_kv_tile(k_cache_ptr, table_row, n, n_ok, kv_head, d, d_ok, block_size,
                          stride_block, stride_row, stride_head, UPCAST)  # [HEAD_PAD, BLOCK_N]
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = n_ok[None, :] & (n[None, :] <= pos[:, None]) \
            & ((window <= 0) | (n[None, :] > pos[:, None] - window))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(v_cache_ptr, table_row, n, n_ok, kv_head, d, d_ok, block_size,
                          stride_block, stride_row, stride_head, UPCAST)  # [HEAD_PAD, BLOCK_N]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), tl.trans(v),
                                            input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + tok)[:, None] * stride_o_tok + heads[:, None] * stride_o_head
             + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


# Re-exported so callers need not import triton to size grids.
cdiv = triton.cdiv
next_power_of_2 = triton.next_power_of_2
