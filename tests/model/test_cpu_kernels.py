"""The C decode-attention kernel against plain attention, and its build and fallback."""

from __future__ import annotations

import pytest
import torch

from kvflow.model import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="no C compiler here")


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query token [H, hd] over its whole context k/v [S, KvH, hd] → [H, hd]."""
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [S, H, hd]
    weights = (torch.einsum("hd,shd->hs", q, k) / q.shape[1] ** 0.5).softmax(-1)  # [H, S]
    return torch.einsum("hs,shd->hd", weights, v)


@pytest.mark.parametrize(("heads", "kv_heads", "block_size"), [(4, 4, 4), (9, 3, 16), (8, 1, 5)])
def test_kernel_matches_reference(heads: int, kv_heads: int, block_size: int) -> None:
    generator = torch.Generator().manual_seed(heads * 100 + block_size)
    head_dim, num_blocks = 64, 200
    seq_lens = [1, block_size, block_size + 1, 37, 300, 2]
    # NaN everywhere nobody wrote: a read past a request's length poisons its output.
    cache = torch.full((2, num_blocks, block_size, kv_heads, head_dim), float("nan"))
    order = torch.randperm(num_blocks, generator=generator).tolist()
    width = max(-(-n // block_size) for n in seq_lens)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int64)
    contexts, used = [], 0
    for row, seq_len in enumerate(seq_lens):
        count = -(-seq_len // block_size)
        tables[row, :count] = torch.tensor(order[used:used + count])
        used += count
        k = torch.randn(seq_len, kv_heads, head_dim, generator=generator)
        v = torch.randn(seq_len, kv_heads, head_dim, generator=generator)
        for pos in range(seq_len):
            block, offset = int(tables[row, pos // block_size]), pos % block_size
            cache[0, block, offset], cache[1, block, offset] = k[pos], v[pos]
        contexts.append((k, v))
    query = torch.randn(len(seq_lens), heads, head_dim, generator=generator)

    out = cpu_kernels.paged_decode_attention(
        query, cache, tables, torch.tensor(seq_lens), head_dim**-0.5)

    expected = torch.stack([_reference(q, k, v) for q, (k, v) in zip(query, contexts, strict=True)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_build_is_cached_per_source(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KVFLOW_CACHE_DIR", str(tmp_path))
    first = cpu_kernels.build()
    assert first.parent == tmp_path / "kernels" and first.exists()
    mtime = first.stat().st_mtime_ns
    assert cpu_kernels.build() == first and first.stat().st_mtime_ns == mtime
    assert list(first.parent.iterdir()) == [first]  # no partial files left behind


def test_disabled_or_unbuildable_falls_back(monkeypatch, tmp_path) -> None:
    cpu_kernels.load.cache_clear()
    try:
        monkeypatch.setenv("KVFLOW_CPU_KERNELS", "0")
        assert cpu_kernels.load() is None
        cpu_kernels.load.cache_clear()
        monkeypatch.delenv("KVFLOW_CPU_KERNELS")
        monkeypatch.setenv("KVFLOW_CACHE_DIR", str(tmp_path))
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        assert cpu_kernels.load() is None
    finally:
        cpu_kernels.load.cache_clear()
