"""The C kernels of the CPU path, compiled once per machine and loaded with ctypes.

`kvflow/csrc/*.c` is plain C with OpenMP, built by the system C compiler (`$CC`, else `cc`)
into `$KVFLOW_CACHE_DIR/kernels/` the first time it is needed (about a second), keyed by
the source, flags and CPU so a changed file or another machine rebuilds. torch already
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
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "paged_attention.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build() -> Path:
    """Compile the kernels (if not cached yet) and return the shared library's path."""
    from kvflow.model.registry import cache_dir  # registry imports the loaders: only when building

    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join([compiler, *FLAGS, platform.machine(), _cpu_model()])
        .encode()
    ).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"kvflow_cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a partial file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial, "-lm"],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {result.stderr.strip()}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def enabled() -> bool:
    """False when KVFLOW_CPU_KERNELS=0 turns kvflow's CPU fast paths off (C kernels, packing)."""
    return os.environ.get("KVFLOW_CPU_KERNELS", "1") != "0"


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they are disabled or cannot be built here."""
    if not enabled():
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("CPU attention kernel unavailable, using the torch path: %s", exc)
        return None
    fn = lib.kvflow_paged_decode_attention
    fn.argtypes = [_ptr] * 6 + [_i64] * 6 + [_f32, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def paged_decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Single-token queries [D, H, hd] over one layer's cache [2, NB, bs, KvH, hd] → [D, H, hd].

    block_tables [D, W] and seq_lens [D] are int64; every tensor is float32 on the CPU.
    """
    lib = load()
    assert lib is not None, "call only when load() returned the library"
    query = query.contiguous()
    assert kv_cache.is_contiguous() and kv_cache.dtype == torch.float32 == query.dtype
    assert block_tables.dtype == torch.int64 == seq_lens.dtype
    num_decodes, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    out = torch.empty_like(query)
    status = lib.kvflow_paged_decode_attention(
        query.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
        block_tables.data_ptr(), seq_lens.data_ptr(), out.data_ptr(),
        num_decodes, block_tables.shape[1], block_size, num_heads, num_kv_heads, head_dim,
        scale, torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("paged decode attention could not allocate its score buffer")
    return out


if __name__ == "__main__":
    print(build())
