"""Paged attention against a plain per-request causal attention."""

from __future__ import annotations

import pytest
import torch

from kvflow.model import cpu_kernels
from kvflow.model.attention import (
    build_attention_metadata,
    group_by_length,
    kv_cache_bytes_per_block,
    kv_cache_shape,
    paged_attention,
)

CPU = torch.device("cpu")
BLOCK_SIZE = 4
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def test_kv_cache_shape_and_bytes() -> None:
    assert kv_cache_shape(10, 16, 3, 64) == (2, 10, 16, 3, 64)
    assert kv_cache_bytes_per_block(30, 16, 3, 64, torch.float32) == 2 * 30 * 16 * 3 * 64 * 4
    assert kv_cache_bytes_per_block(30, 16, 3, 64, torch.bfloat16) == 2 * 30 * 16 * 3 * 64 * 2


def test_slot_mapping_follows_block_tables() -> None:
    # r0: 3 new tokens after 2 cached ones; r1: one decode at position 5.
    metadata = build_attention_metadata([3, 1], [5, 6], [[7, 2], [4, 9]], BLOCK_SIZE, CPU)
    expected = [7 * 4 + 2, 7 * 4 + 3, 2 * 4 + 0, 9 * 4 + 1]
    assert metadata.slot_mapping.tolist() == expected
    assert metadata.num_tokens == 4
    assert len(metadata.prefills) == 1 and metadata.prefills[0].start == 0
    assert metadata.decode_token_indices is not None
    assert metadata.decode_token_indices.tolist() == [3]


@pytest.mark.parametrize(
    ("query_lens", "seq_lens", "tables"),
    [([0], [3], [[0]]), ([4], [3], [[0]]), ([3], [9], [[0, 1]]), ([1, 1], [1], [[0], [1]])],
)
def test_bad_metadata_is_refused(
    query_lens: list[int], seq_lens: list[int], tables: list[list[int]]
) -> None:
    with pytest.raises(ValueError):
        build_attention_metadata(query_lens, seq_lens, tables, BLOCK_SIZE, CPU)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last q.shape[0] positions over all k.shape[0] positions."""
    num_queries, num_keys = q.shape[0], k.shape[0]
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)  # [S, H, hd]
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)  # [S, H, hd]
    scores = torch.einsum("qhd,shd->hqs", q, k) / HEAD_DIM**0.5  # [H, Q, S]
    positions = torch.arange(num_keys - num_queries, num_keys)  # [Q]
    visible = torch.arange(num_keys)[None, :] <= positions[:, None]  # [Q, S]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v)  # [Q, H, hd]


@pytest.mark.parametrize("cpu_kernel", [False, True], ids=["torch", "c-kernel"])
def test_mixed_batch_matches_reference(cpu_kernel: bool) -> None:
    """Fresh prefill, chunk over cached context, and decodes of different lengths together."""
    if cpu_kernel and cpu_kernels.load() is None:
        pytest.skip("no C compiler here")
    generator = torch.Generator().manual_seed(0)
    query_lens = [6, 1, 5, 1, 1]
    seq_lens = [6, 9, 12, 1, 14]
    num_blocks = 32
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables, used = [], 0
    for seq_len in seq_lens:
        count = -(-seq_len // BLOCK_SIZE)
        tables.append(order[used : used + count])
        used += count

    cache = torch.full((2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM), float("nan"))
    flat_k, flat_v = cache[0].view(-1, KV_HEADS, HEAD_DIM), cache[1].view(-1, KV_HEADS, HEAD_DIM)
    full = []  # per request: (q, k, v) for all of its positions
    for seq_len in seq_lens:
        q = torch.randn(seq_len, HEADS, HEAD_DIM, generator=generator)
        k = torch.randn(seq_len, KV_HEADS, HEAD_DIM, generator=generator)
        v = torch.randn(seq_len, KV_HEADS, HEAD_DIM, generator=generator)
        full.append((q, k, v))
    # Earlier steps already cached the context of each request.
    for (_, k, v), table, seq_len, query_len in zip(
        full, tables, seq_lens, query_lens, strict=True
    ):
        for pos in range(seq_len - query_len):
            slot = table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
            flat_k[slot], flat_v[slot] = k[pos], v[pos]

    new = [(q[-n:], k[-n:], v[-n:]) for (q, k, v), n in zip(full, query_lens, strict=True)]
    query, key, value = (torch.cat(parts) for parts in zip(*new, strict=True))
    metadata = build_attention_metadata(query_lens, seq_lens, tables, BLOCK_SIZE, CPU,
                                        cpu_kernel=cpu_kernel)
    output = paged_attention(query, key, value, cache, metadata, HEAD_DIM**-0.5)

    expected = torch.cat(
        [_reference(q[-n:], k, v) for (q, k, v), n in zip(full, query_lens, strict=True)]
    )
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    # The new tokens' K/V were written into their slots.
    torch.testing.assert_close(flat_k[metadata.slot_mapping], key)
    torch.testing.assert_close(flat_v[metadata.slot_mapping], value)


def test_decodes_are_grouped_by_length() -> None:
    seq_lens = [64, 5, 60, 48, 47, 12, 16]  # block_size 4: 16, 2, 15, 12, 12, 3, 4 blocks
    groups = group_by_length([0, 1, 2, 3, 4, 5, 6], seq_lens, BLOCK_SIZE)
    assert groups == [[0, 2, 3, 4], [6, 5], [1]]
    metadata = build_attention_metadata(
        [1] * 3, [64, 60, 8], [list(range(16)), list(range(16, 31)), [31, 32]], BLOCK_SIZE, CPU)
    first, second = metadata.decodes
    assert first.blocks.shape == (2, 16) and first.padding_rows is not None
    assert first.padding_rows.tolist() == [64 + i for i in range(60, 64)]
    assert second.mask is None and second.padding_rows is None  # exactly two full blocks
    assert metadata.decode_token_indices is not None
    assert metadata.decode_token_indices.tolist() == [0, 1, 2]


@pytest.mark.parametrize("context", [0, 6], ids=["new prompt", "after cached tokens"])
def test_prefill_runs_torch_fused_kernel_not_the_math_path(context: int) -> None:
    """3-D inputs send CPU SDPA to its unfused math path (3.5x slower at 512 tokens)."""
    query_len = 5
    table = [[0, 1, 2]]
    metadata = build_attention_metadata([query_len], [context + query_len], table, BLOCK_SIZE,
                                        CPU)
    cache = torch.randn(kv_cache_shape(3, BLOCK_SIZE, KV_HEADS, HEAD_DIM))
    q = torch.randn(query_len, HEADS, HEAD_DIM)
    k, v = torch.randn(2, query_len, KV_HEADS, HEAD_DIM)
    with torch.profiler.profile() as prof:
        paged_attention(q, k, v, cache, metadata, scale=HEAD_DIM**-0.5)
    ops = {event.name for event in prof.events()}
    assert "aten::_scaled_dot_product_attention_math" not in ops
    assert any("flash_attention" in op for op in ops), sorted(ops)
