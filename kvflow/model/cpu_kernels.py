"""The C kernels of the CPU path, compiled once per machine and ISA level, loaded with ctypes.

`kvflow/csrc/*.c` is plain C with OpenMP, built by the system C compiler (`$CC`, else `cc`)
into `$KVFLOW_CACHE_DIR/kernels/` the first time it is needed (about a second), keyed by
the source, flags and CPU so a changed file or another machine rebuilds. There is one build
per ISA level (kvflow.model.cpu_isa: generic, avx2, avx512, avx512_bf16; amx loads the
avx512_bf16 build), each compiled for its level's instructions only, never `-march=native`:
the level this CPU runs is loaded, so no build reaches a CPU that lacks its instructions.
A loaded build first checks its kernels against plain references on small shapes; a build
that fails (a compiler or kernel bug on an ISA this project could not test) is dropped
for the level below, with an error in the log. torch already
loaded its OpenMP runtime (libgomp.so.1), and the library links against the same soname,
so both share one thread pool instead of fighting over the cores.

Where no compiler exists, a build fails, or `KVFLOW_CPU_KERNELS=0`, `load()` returns None
and callers keep the pure-torch path, which computes the same thing.

    python -m kvflow.model.cpu_kernels   # build now (make setup does) and print the path
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from kvflow.model import cpu_isa
from kvflow.model.cache import cache_dir

logger = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).resolve().parent.parent / "csrc").glob("*.c"))
HEADERS = sorted((Path(__file__).resolve().parent.parent / "csrc").glob("*.h"))
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=c11"]

# Each level's instructions (cumulative). avx2 is x86-64-v3 (with BMI, LZCNT, MOVBE: the
# decode attention's address arithmetic ran ~10% faster with them), avx512 x86-64-v4.
# -mtune only schedules; it adds no instruction.
_AVX2 = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt", "-mmovbe"]
_AVX512 = [*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"]
ISA_FLAGS: dict[str, list[str]] = {
    "generic": [],
    "avx2": [*_AVX2, "-mtune=native"],
    "avx512": [*_AVX512, "-mtune=native"],
    "avx512_bf16": [*_AVX512, "-mavx512bf16", "-mavx512vnni", "-mtune=native"],
}
# The C build each level loads: AMX's own speed comes from oneDNN (torch), above the GEMV
# range; in it the avx512_bf16 kernels serve.
BUILD_OF = {"generic": "generic", "avx2": "avx2", "avx512": "avx512",
            "avx512_bf16": "avx512_bf16", "amx": "avx512_bf16"}

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(level: str | None = None) -> Path:
    """Compile the kernels of one ISA level (default: the level in use) if not cached yet,
    and return the shared library's path."""
    build_level = BUILD_OF[level or cpu_isa.detect().level]
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    flags = [*FLAGS, *ISA_FLAGS[build_level]]
    identity = " ".join([compiler, *flags, platform.machine(), cpu_isa.cpu_model()]).encode()
    text = b"".join(src.read_bytes() for src in (*SOURCES, *HEADERS))
    key = hashlib.sha256(text + identity).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"kvflow_cpu-{build_level}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a partial file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", partial, "-lm"],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on kvflow/csrc ({build_level}): "
                               f"{result.stderr.strip()}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def enabled() -> bool:
    """False when KVFLOW_CPU_KERNELS=0 turns kvflow's CPU fast paths off (C kernels, packing)."""
    return os.environ.get("KVFLOW_CPU_KERNELS", "1") != "0"


def load(level: str | None = None) -> ctypes.CDLL | None:
    """The compiled kernels of the level in use (or of `level`), or None when they are
    disabled or cannot be built here. A build that fails its self-check gives way to the
    level below."""
    if not enabled():
        return None
    return _load(level or cpu_isa.detect().level)


def reset() -> None:
    """Forget the loaded kernels and the detected ISA (after KVFLOW_CPU_ISA or the cache
    folder changed; tests)."""
    _load.cache_clear()
    cpu_isa.detect.cache_clear()


@functools.cache
def _load(level: str) -> ctypes.CDLL | None:
    build_level = BUILD_OF[level]
    try:
        lib = _bind(ctypes.CDLL(str(build(build_level))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("CPU kernels (%s) unavailable: %s", build_level, exc)
        lib = None
    if lib is not None:
        failed = _self_check(lib)
        if failed is None:
            return lib
        logger.error("the %s CPU kernels failed their self-check (%s); using the level below",
                     build_level, failed)
    lower = cpu_isa.LEVELS.index(build_level) - 1
    if lower < 0:
        logger.warning("no CPU kernels: using the torch path")
        return None
    return _load(cpu_isa.LEVELS[lower])


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    fn = lib.kvflow_paged_decode_attention
    fn.argtypes = [_ptr] * 6 + [_i64] * 6 + [_f32, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    lib.kvflow_linear_f32.argtypes = [_ptr] * 4 + [_i64] * 3 + [ctypes.c_int]
    lib.kvflow_linear_f32.restype = None
    lib.kvflow_linear_bf16.argtypes = [_ptr] * 4 + [_i64] * 3 + [ctypes.c_int]
    lib.kvflow_linear_bf16.restype = ctypes.c_int
    lib.kvflow_linear_i8.argtypes = [_ptr] * 5 + [_i64] * 3 + [ctypes.c_int]
    lib.kvflow_linear_i8.restype = ctypes.c_int
    lib.kvflow_rms_norm.argtypes = [_ptr] * 4 + [_i64] * 2 + [_f32, ctypes.c_int]
    lib.kvflow_rms_norm.restype = None
    lib.kvflow_rotary_cache_write.argtypes = [_ptr, _i64, *[_ptr] * 5, *[_i64] * 4,
                                              ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.kvflow_rotary_cache_write.restype = None
    lib.kvflow_silu_mul.argtypes = [_ptr, _ptr, _i64, _i64, ctypes.c_int]
    lib.kvflow_silu_mul.restype = None
    lib.kvflow_decode_layer.argtypes = [_ptr, _ptr, _f32, _f32, *[_ptr] * 9, _i64, _i64, _i64,
                                        _ptr, _ptr, _ptr, _ptr, ctypes.c_int]
    lib.kvflow_decode_layer.restype = ctypes.c_int
    lib.kvflow_lora_add.argtypes = [_ptr, _i64, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _i64,
                                    _i64, _ptr, ctypes.c_int]
    lib.kvflow_lora_add.restype = ctypes.c_int
    lib.kvflow_shm_all_reduce.argtypes = [_ptr, _i64, _i64, _i64, _i64, _ptr, _i64,
                                          ctypes.c_double]
    lib.kvflow_shm_all_reduce.restype = ctypes.c_int
    lib.kvflow_shm_gather.argtypes = [_ptr, _i64, _i64, _i64, _i64, _ptr, _i64, _ptr,
                                      ctypes.c_double]
    lib.kvflow_shm_gather.restype = ctypes.c_int
    lib.kvflow_shm_set_abort.argtypes = [_ptr, _i64]
    lib.kvflow_shm_set_abort.restype = None
    return lib


def _self_check(lib: ctypes.CDLL) -> str | None:
    """Run the GEMV kernels (float32, bfloat16, int8) and decode attention (float32 and
    bfloat16 caches) on small ragged shapes against torch; None when all agree, else what
    failed. A few milliseconds, once per process and level."""
    gen = torch.Generator().manual_seed(0)
    for tokens in (1, 5, 9):
        x = torch.randn(tokens, 72, generator=gen)
        weight = torch.randn(13, 72, generator=gen)
        bias = torch.randn(13, generator=gen)
        expected = F.linear(x, weight, bias)
        out = x.new_empty(tokens, 13)
        lib.kvflow_linear_f32(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(),
                              tokens, 13, 72, 1)
        if not torch.allclose(out, expected, rtol=1e-4, atol=1e-4):
            return f"float32 linear at {tokens} tokens"
        wb = weight.bfloat16()
        expected = F.linear(x, wb.float(), bias)
        status = lib.kvflow_linear_bf16(x.data_ptr(), wb.data_ptr(), bias.data_ptr(),
                                        out.data_ptr(), tokens, 13, 72, 1)
        if status != 0 or not torch.allclose(out, expected, rtol=1e-4, atol=1e-4):
            return f"bfloat16 linear at {tokens} tokens"
        xi = torch.randn(tokens, 64, generator=gen)
        qweight = torch.randint(-127, 128, (13, 64), dtype=torch.int8, generator=gen)
        scale = torch.rand(13, generator=gen) / 100
        expected = F.linear(xi, qweight.float() * scale[:, None], bias)
        status = lib.kvflow_linear_i8(xi.data_ptr(), qweight.data_ptr(), scale.data_ptr(),
                                      bias.data_ptr(), out.data_ptr(), tokens, 13, 64, 1)
        if status != 0 or not torch.allclose(out, expected, rtol=1e-3, atol=1e-2):
            return f"int8 linear at {tokens} tokens"
    for dtype in (torch.float32, torch.bfloat16):
        cache = torch.randn(2, 6, 4, 2, 16, generator=gen).to(dtype)
        query = torch.randn(3, 4, 16, generator=gen)
        tables = torch.tensor([[5, 0, 3], [1, 2, 4], [3, 0, 0]])
        lens = torch.tensor([11, 5, 1])
        out = torch.empty_like(query)
        status = lib.kvflow_paged_decode_attention(
            query.data_ptr(), *_key_value_addresses(cache), tables.data_ptr(),
            lens.data_ptr(), out.data_ptr(), 3, 3, 4, 4, 2, 16, 0.25,
            int(dtype == torch.bfloat16), 1)
        for d in range(3):
            rows = torch.cat([cache[:, b] for b in tables[d]], dim=1)[:, :lens[d]].float()
            keys, values = rows[0].repeat_interleave(2, 1), rows[1].repeat_interleave(2, 1)
            scores = torch.einsum("hd,thd->ht", query[d], keys) * 0.25
            expected = torch.einsum("ht,thd->hd", scores.softmax(-1), values)
            if status != 0 or not torch.allclose(out[d], expected, rtol=1e-4, atol=1e-4):
                return f"decode attention with a {dtype} cache"
    return None


def _lib() -> ctypes.CDLL:
    lib = load()
    assert lib is not None, "call only when load() returned the library"
    return lib


def _key_value_addresses(kv_cache: torch.Tensor) -> tuple[int, int]:
    """Addresses of the K and V halves of one layer's cache [2, NB, bs, KvH, hd], without
    building view tensors (this runs for every layer of every step)."""
    key = kv_cache.data_ptr()
    return key, key + kv_cache.stride(0) * kv_cache.element_size()


def paged_decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Single-token queries [D, H, hd] over one layer's cache [2, NB, bs, KvH, hd] → [D, H, hd].

    block_tables [D, W] and seq_lens [D] are int64; the cache is float32 or bfloat16 on the
    CPU, the query any float type (computed in float32, returned in the query's dtype).
    """
    lib = _lib()
    out_dtype = query.dtype
    query = query.float().contiguous()
    assert kv_cache.is_contiguous() and kv_cache.dtype in (torch.float32, torch.bfloat16)
    assert block_tables.dtype == torch.int64 == seq_lens.dtype
    num_decodes, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    out = torch.empty_like(query)
    status = lib.kvflow_paged_decode_attention(
        query.data_ptr(), *_key_value_addresses(kv_cache),
        block_tables.data_ptr(), seq_lens.data_ptr(), out.data_ptr(),
        num_decodes, block_tables.shape[1], block_size, num_heads, num_kv_heads, head_dim,
        scale, int(kv_cache.dtype == torch.bfloat16), torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("paged decode attention could not allocate its score buffer")
    return out.to(out_dtype)


def _linear_operands(x: torch.Tensor, weight: torch.Tensor) -> tuple[ctypes.CDLL, torch.Tensor,
                                                                     torch.Tensor]:
    lib = _lib()
    assert weight.is_contiguous()
    x = x.reshape(-1, x.shape[-1]).float().contiguous()  # [T, K] float32
    return lib, x, x.new_empty(x.shape[0], weight.shape[0])


def linear_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] · weight [N, K]ᵀ (+ bias [N]) → [T, N] float32, for few tokens (GEMV)."""
    lib, x, out = _linear_operands(x, weight)
    assert weight.dtype == torch.float32
    lib.kvflow_linear_f32(x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None
                          else None, out.data_ptr(), *x.shape[:1], *weight.shape,
                          torch.get_num_threads())
    return out


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] (any float type) · weight [N, K]ᵀ bfloat16 (+ bias [N] float32) → [T, N]
    float32: the weights widened as they are read, sums in float32."""
    lib, x, out = _linear_operands(x, weight)
    assert weight.dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.float32)
    status = lib.kvflow_linear_bf16(x.data_ptr(), weight.data_ptr(), bias.data_ptr()
                                    if bias is not None else None, out.data_ptr(),
                                    *x.shape[:1], *weight.shape, torch.get_num_threads())
    if status != 0:
        raise MemoryError("bfloat16 linear could not allocate its row buffers")
    return out


def linear_i8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] · (qweight [N, K] int8 · scale [N])ᵀ (+ bias [N]) → [T, N] float32."""
    lib, x, out = _linear_operands(x, qweight)
    assert qweight.dtype == torch.int8 and scale.dtype == torch.float32
    status = lib.kvflow_linear_i8(x.data_ptr(), qweight.data_ptr(), scale.data_ptr(),
                                  bias.data_ptr() if bias is not None else None, out.data_ptr(),
                                  *x.shape[:1], *qweight.shape, torch.get_num_threads())
    if status != 0:
        raise MemoryError("int8 linear could not allocate its row buffer")
    return out


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> torch.Tensor:
    """RMSNorm of x [T, H] (or of residual += x, in place, when a residual is given)."""
    assert x.is_contiguous() and x.dtype == torch.float32
    assert residual is None or residual.is_contiguous()
    out = torch.empty_like(x)
    _lib().kvflow_rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(),
                           weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps,
                           torch.get_num_threads())
    return out


def rotary_cache_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       kv_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int) -> None:
    """Rotate the q and k parts of fused qkv rows [T, (H + 2 KvH) hd] in place by the cos/sin
    tables [T, hd] (float32), then write k and v into their slots of the cache
    [2, NB, bs, KvH, hd]. qkv and the cache are float32 or bfloat16 (the same, or a float32
    qkv into a bfloat16 cache)."""
    _, _, _, num_kv_heads, head_dim = kv_cache.shape
    assert qkv.stride(1) == 1 and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim
    assert cos.is_contiguous() and sin.is_contiguous() and kv_cache.is_contiguous()
    assert cos.dtype == sin.dtype == torch.float32
    assert slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
    qkv_bf16, cache_bf16 = qkv.dtype == torch.bfloat16, kv_cache.dtype == torch.bfloat16
    assert qkv.dtype in (torch.float32, torch.bfloat16) and (cache_bf16 or not qkv_bf16)
    _lib().kvflow_rotary_cache_write(
        qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(),
        *_key_value_addresses(kv_cache), slot_mapping.data_ptr(), qkv.shape[0], num_heads,
        num_kv_heads, head_dim, int(qkv_bf16), int(cache_bf16), torch.get_num_threads())


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over rows [T, 2 I] = [gate | up] → [T, I]."""
    assert gate_up.is_contiguous() and gate_up.dtype == torch.float32
    tokens, width = gate_up.shape
    out = gate_up.new_empty(tokens, width // 2)
    _lib().kvflow_silu_mul(gate_up.data_ptr(), out.data_ptr(), tokens, width // 2,
                           torch.get_num_threads())
    return out


def lora_add(out: torch.Tensor, x: torch.Tensor, slot_of_token: torch.Tensor, a: torch.Tensor,
             b: torch.Tensor, sub_sizes: Sequence[int]) -> None:
    """out [T, N] += each token's adapter: (x [T, K] · a[s]ᵀ) · b[s], with a [S, n_sub R, K],
    b [S, n_sub R, N] (block-diagonal over the sub-projections) float32 and slot_of_token [T]
    int64 (-1: none). See csrc/lora.c."""
    assert out.dtype == x.dtype == a.dtype == b.dtype == torch.float32
    assert out.stride(1) == 1 and x.is_contiguous() and a.is_contiguous() and b.is_contiguous()
    assert slot_of_token.dtype == torch.int64 and slot_of_token.is_contiguous()
    num_slots, shrink, _ = a.shape
    sizes = (ctypes.c_int64 * len(sub_sizes))(*sub_sizes)
    status = _lib().kvflow_lora_add(
        out.data_ptr(), out.stride(0), x.data_ptr(), x.shape[0], x.shape[1],
        slot_of_token.data_ptr(), a.data_ptr(), b.data_ptr(), num_slots,
        b.shape[1] // len(sub_sizes),
        len(sub_sizes), sizes, torch.get_num_threads())
    if status != 0:
        raise MemoryError("the LoRA kernel could not allocate its buffers")


class DecodeLayer:
    """The fixed arguments of kvflow_decode_layer for one decoder layer: weight pointers
    (norms, then weight/scale/bias of qkv, o, gate_up, down) and dimensions.

    Weights are float32, bfloat16 or int8 (with a scale); norm weights and biases are read
    as float32 (copies kept here where the model holds them in bfloat16). The pointers are
    read once: the weights must not move afterwards (callers rebuild when the first
    weight's address changes). `lora`: the LoRA slot weights (a [S, n_sub R, K],
    b [S, n_sub R, N]) of the four projections, or None; slots are filled in place, never
    moved.
    """

    def __init__(self, norms: tuple[torch.Tensor, torch.Tensor],
                 projections: Sequence[tuple[torch.Tensor, torch.Tensor | None,
                                             torch.Tensor | None]],
                 dims: tuple[int, int, int, int, int], eps: float, scale: float,
                 lora: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        weight = projections[0][0]
        kind = 1 if projections[0][1] is not None else 2 if weight.dtype == torch.bfloat16 else 0
        as_f32 = [n.float().contiguous() for n in norms]
        parts = [(w, scale, None if bias is None else bias.float().contiguous())
                 for w, scale, bias in projections]
        tensors = [*as_f32, *(t for proj in parts for t in proj)]
        for t in tensors:
            assert t is None or t.is_contiguous()
        self.pointers = (ctypes.c_void_p * len(tensors))(
            *(None if t is None else t.data_ptr() for t in tensors))
        self._tensors = tensors  # keeps the float32 copies alive as long as their pointers
        # [6]: bf16 cache, [7]: which part of the layer (tensor parallel), both set per call
        self.dims = (ctypes.c_int64 * 8)(*dims, kind, 0, 0)
        self.eps, self.scale = eps, scale
        hidden, heads, kv_heads, head_dim, inter = dims
        self.scratch_per_token = hidden + (3 * heads + 2 * kv_heads) * head_dim + 3 * inter
        self.address = projections[0][0].data_ptr()
        self.lora = None if lora is None else (ctypes.c_void_p * 8)(
            *(t.data_ptr() for pair in lora for t in pair))
        self.lora_dims = None if lora is None else (ctypes.c_int64 * 2)(
            lora[0][0].shape[0], lora[0][1].shape[1] // 3)  # qkv: 3 parts of the max rank
        self._lora_tensors = lora  # keeps the slot tensors alive as long as their pointers


def decode_layer(layer: DecodeLayer, hidden: torch.Tensor, residual: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                 slots: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scratch: torch.Tensor, lora_slots: torch.Tensor | None = None,
                 part: int = 0) -> None:
    """One decoder layer over T decode tokens [T, hidden], in place: residual += hidden (the
    layer's input) ... hidden = the layer's MLP output. See csrc/decode_layer.c.

    lora_slots [T] int64: each token's adapter slot (-1: none), or None for no LoRA.
    part: 0 the whole layer, 1 up to the output projection (hidden = its output), 2 the rest
    (tensor parallelism all-reduces hidden between the parts)."""
    with_lora = lora_slots is not None and layer.lora is not None
    layer.dims[6] = int(kv_cache.dtype == torch.bfloat16)
    layer.dims[7] = part
    status = _lib().kvflow_decode_layer(
        layer.pointers, layer.dims, layer.eps, layer.scale, hidden.data_ptr(),
        residual.data_ptr(), cos.data_ptr(), sin.data_ptr(), *_key_value_addresses(kv_cache),
        slots.data_ptr(), block_tables.data_ptr(), seq_lens.data_ptr(),
        block_tables.shape[1], kv_cache.shape[2], hidden.shape[0], scratch.data_ptr(),
        layer.lora if with_lora else None, layer.lora_dims if with_lora else None,
        lora_slots.data_ptr() if with_lora else None,  # type: ignore[union-attr]
        torch.get_num_threads())
    if status != 0:
        raise MemoryError("a decode layer kernel could not allocate its buffers")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build())
