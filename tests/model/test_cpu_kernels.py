"""The C kernels against torch references (attention, linear, norm, SiLU, rotary), in every
ISA build this CPU runs (the others skip, naming the ISA they need), their build and fallback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kvflow.model import cpu_isa, cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="no C compiler here")


@pytest.fixture(autouse=True, params=["generic", "avx2", "avx512", "avx512_bf16"])
def isa_build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each test runs once per kernel build, forced through KVFLOW_CPU_ISA."""
    reason = cpu_isa.skip_reason(request.param)
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv("KVFLOW_CPU_ISA", request.param)
    cpu_kernels.reset()
    lib = cpu_kernels.load()
    assert lib is not None and f"kvflow_cpu-{request.param}-" in lib._name
    yield request.param
    cpu_kernels.reset()


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query token [H, hd] over its whole context k/v [S, KvH, hd] → [H, hd]."""
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [S, H, hd]
    weights = (torch.einsum("hd,shd->hs", q, k) / q.shape[1] ** 0.5).softmax(-1)  # [H, S]
    return torch.einsum("hs,shd->hd", weights, v)


# Several head sizes (12: not a multiple of the vector width) and lengths off block edges.
@pytest.mark.parametrize(("heads", "kv_heads", "block_size", "head_dim"), [
    (4, 4, 4, 64), (9, 3, 16, 64), (8, 1, 5, 64), (4, 2, 16, 128), (2, 1, 16, 96),
    (4, 2, 16, 12),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(heads: int, kv_heads: int, block_size: int,
                                  head_dim: int, dtype: torch.dtype) -> None:
    """bfloat16: the cache holds bf16 (half the bytes read), compared with the float32
    reference over the same rounded values."""
    generator = torch.Generator().manual_seed(heads * 100 + block_size)
    num_blocks = 200
    seq_lens = [1, block_size, block_size + 1, 37, 300, 2]
    # NaN everywhere nobody wrote: a read past a request's length poisons its output.
    cache = torch.full((2, num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    order = torch.randperm(num_blocks, generator=generator).tolist()
    width = max(-(-n // block_size) for n in seq_lens)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int64)
    contexts, used = [], 0
    for row, seq_len in enumerate(seq_lens):
        count = -(-seq_len // block_size)
        tables[row, :count] = torch.tensor(order[used:used + count])
        used += count
        k = torch.randn(seq_len, kv_heads, head_dim, generator=generator).to(dtype).float()
        v = torch.randn(seq_len, kv_heads, head_dim, generator=generator).to(dtype).float()
        for pos in range(seq_len):
            block, offset = int(tables[row, pos // block_size]), pos % block_size
            cache[0, block, offset], cache[1, block, offset] = k[pos].to(dtype), v[pos].to(dtype)
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
    cpu_kernels.reset()
    try:
        monkeypatch.setenv("KVFLOW_CPU_KERNELS", "0")
        assert cpu_kernels.load() is None
        cpu_kernels.reset()
        monkeypatch.delenv("KVFLOW_CPU_KERNELS")
        monkeypatch.setenv("KVFLOW_CACHE_DIR", str(tmp_path))
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        assert cpu_kernels.load() is None
    finally:
        cpu_kernels.reset()


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(tokens: int, with_residual: bool) -> None:
    torch.manual_seed(tokens)
    x, weight = torch.randn(tokens, 100), torch.randn(100)
    residual = torch.randn(tokens, 100) if with_residual else None
    source = x + residual if residual is not None else x
    expected = weight * source * torch.rsqrt(source.pow(2).mean(-1, keepdim=True) + 1e-5)
    out = cpu_kernels.rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if residual is not None:
        torch.testing.assert_close(residual, source)  # the stream was updated in place


@pytest.mark.parametrize("width", [3, 64, 101])
def test_silu_mul_matches_torch(width: int) -> None:
    """Vector lanes and the scalar tail; extreme inputs saturate instead of overflowing."""
    torch.manual_seed(width)
    gate_up = torch.randn(4, 2 * width) * 8
    gate_up[0, :width] = torch.linspace(-200, 200, width)
    gate, up = gate_up.split(width, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(cpu_kernels.silu_mul(gate_up), expected, atol=1e-5, rtol=1e-5)


def test_rotary_cache_write_matches_torch() -> None:
    from kvflow.model.layers import RotaryEmbedding, apply_rotary

    torch.manual_seed(0)
    heads, kv_heads, head_dim, tokens, block_size = 6, 2, 16, 5, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    positions = torch.tensor([0, 1, 7, 30, 31])
    cos, sin = RotaryEmbedding(head_dim, 10000.0, None)(positions, torch.float32)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q_ref, k_ref = apply_rotary(q.reshape(tokens, heads, head_dim),
                                k.reshape(tokens, kv_heads, head_dim), cos, sin)
    v_ref = v.reshape(tokens, kv_heads, head_dim).clone()
    cache = torch.full((2, 8, block_size, kv_heads, head_dim), float("nan"))
    slots = torch.tensor([3, 9, 0, 31, 17])
    cpu_kernels.rotary_cache_write(qkv, cos, sin, cache, slots, heads)
    torch.testing.assert_close(q.reshape(tokens, heads, head_dim), q_ref)  # rotated in place
    torch.testing.assert_close(k.reshape(tokens, kv_heads, head_dim), k_ref)
    flat = cache.view(2, -1, kv_heads, head_dim)
    torch.testing.assert_close(flat[0, slots], k_ref)
    torch.testing.assert_close(flat[1, slots], v_ref)
    untouched = torch.ones(flat.shape[1], dtype=torch.bool)
    untouched[slots] = False
    assert flat[:, untouched].isnan().all()


@pytest.mark.parametrize("qkv_dtype", [torch.float32, torch.bfloat16])
def test_rotary_cache_write_bf16(qkv_dtype: torch.dtype) -> None:
    """Into a bfloat16 cache, from bf16 rows (rotated in place, in float32, rounded once) or
    from float32 rows (the decode layer's case: rounded when stored)."""
    from kvflow.model.layers import RotaryEmbedding, apply_rotary

    torch.manual_seed(1)
    heads, kv_heads, head_dim, tokens = 6, 2, 16, 5
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(qkv_dtype)
    positions = torch.tensor([0, 1, 7, 30, 31])
    cos, sin = RotaryEmbedding(head_dim, 10000.0, None)(positions, torch.float32)
    source = qkv.float()
    q, k, v = source.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q_ref, k_ref = apply_rotary(q.reshape(tokens, heads, head_dim),
                                k.reshape(tokens, kv_heads, head_dim), cos, sin)
    v_ref = v.reshape(tokens, kv_heads, head_dim)
    cache = torch.full((2, 8, 4, kv_heads, head_dim), float("nan"), dtype=torch.bfloat16)
    slots = torch.tensor([3, 9, 0, 31, 17])
    cpu_kernels.rotary_cache_write(qkv, cos, sin, cache, slots, heads)
    rotated = qkv[:, :heads * head_dim].reshape(tokens, heads, head_dim)
    torch.testing.assert_close(rotated, q_ref.to(qkv_dtype), atol=0, rtol=0.01)
    flat = cache.view(2, -1, kv_heads, head_dim)
    torch.testing.assert_close(flat[0, slots], k_ref.bfloat16(), atol=0, rtol=0.01)
    torch.testing.assert_close(flat[1, slots], v_ref.bfloat16(), atol=0, rtol=0)
    untouched = torch.ones(flat.shape[1], dtype=torch.bool)
    untouched[slots] = False
    assert flat[:, untouched].isnan().all()


# 8 and more tokens widen six rows at a time into a buffer for the float32 tiles.
@pytest.mark.parametrize("tokens", [1, 3, 4, 8, 9, 13, 64])
def test_bf16_linear_matches_torch(tokens: int) -> None:
    torch.manual_seed(tokens)
    for rows, width in ((36, 70), (37, 64), (41, 64), (13, 576)):
        x = torch.randn(tokens, width)
        weight, bias = torch.randn(rows, width).bfloat16(), torch.randn(rows)
        expected = torch.nn.functional.linear(x, weight.float(), bias)
        torch.testing.assert_close(cpu_kernels.linear_bf16(x, weight, bias), expected,
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cpu_kernels.linear_bf16(x.bfloat16(), weight, None),
                                   torch.nn.functional.linear(x.bfloat16().float(),
                                                              weight.float()),
                                   atol=1e-4, rtol=1e-4)


# 8 and more tokens take the six-row tiles (36 rows: six; 70 = 8 * 8 + 6: a tail in K);
# 9 and 13 leave a token tail.
@pytest.mark.parametrize("tokens", [1, 3, 4, 8, 9, 13, 64])
def test_linear_kernels_match_torch(tokens: int) -> None:
    from kvflow.model.quant import quantize_int8

    torch.manual_seed(tokens)
    x, weight, bias = torch.randn(tokens, 70), torch.randn(36, 70), torch.randn(36)
    torch.testing.assert_close(cpu_kernels.linear_f32(x, weight, bias),
                               torch.nn.functional.linear(x, weight, bias), atol=1e-4, rtol=1e-4)
    for rows in (37, 41):  # one and five rows past the last group of six
        w2, b2 = torch.randn(rows, 64), torch.randn(rows)
        torch.testing.assert_close(cpu_kernels.linear_f32(x[:, :64], w2, b2),
                                   torch.nn.functional.linear(x[:, :64], w2, b2),
                                   atol=1e-4, rtol=1e-4)
    q, scale = quantize_int8(weight)
    # K = 70 is no multiple of 32: int8 weights meet float activations, exactly.
    expected = torch.nn.functional.linear(x, q.float() * scale[:, None])
    torch.testing.assert_close(cpu_kernels.linear_i8(x, q, scale, None), expected,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tokens", [1, 5])
def test_int8_kernel_integer_path(tokens: int) -> None:
    """K a multiple of 32 takes the integer path (activations in int16 blocks of 32 with
    their own scales): as close to the float product as float rounding allows, an outlier in
    one block included."""
    from kvflow.model.quant import quantize_int8

    torch.manual_seed(tokens)
    x, weight, bias = torch.randn(tokens, 576), torch.randn(96, 576) / 24, torch.randn(96)
    x[:, 5] = 50.0  # an outlier in the first block only
    q, scale = quantize_int8(weight)
    expected = torch.nn.functional.linear(x, q.float() * scale[:, None], bias)
    out = cpu_kernels.linear_i8(x, q, scale, bias)
    assert ((out - expected).norm() / expected.norm()).item() < 1e-4
