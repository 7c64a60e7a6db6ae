"""CPU memory for weights and KV cache in transparent huge pages (Linux).

A decode step streams every weight once (hundreds of MB): in 4 KiB pages that is a TLB miss
every 4 KiB. Where the kernel's transparent huge pages are in `madvise` mode (a common
default, and this machine's), memory must ask for them: these helpers map anonymous memory,
advise it MADV_HUGEPAGE before first touch, and place tensors in it. The matrix-vector
kernels streamed weights 10-20% faster from it here (BENCHMARKS.md). Elsewhere (no
MADV_HUGEPAGE, not Linux) they fall back to ordinary tensors.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys
from typing import Any

import torch
from torch import nn

_HUGE = 2 << 20  # x86-64 and arm64 (4 KiB base pages) huge page size
_ALIGN = 64


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")


def zeros(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed 1-D CPU tensor in huge-page-advised memory, every page touched now (so the
    memory is resident from the start, as torch.zeros would make it, not faulted in later)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    nbytes = max(numel * itemsize, 1)
    if not supported():
        return torch.zeros(numel, dtype=dtype)
    # Private anonymous memory: THP's `enabled` setting governs it (shared memory would
    # follow `shmem_enabled`). The tensor keeps the mapping alive.
    area = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(area, dtype=torch.uint8)
    start = (-raw.data_ptr()) % _HUGE
    return raw[start:start + numel * itemsize].view(dtype).zero_()


def move_to_hugepages_(model: nn.Module) -> nn.Module:
    """Copy every parameter and buffer of a CPU model into one huge-page arena, in place.

    Tensors that share storage (a tied head over the embedding table) stay shared.
    """
    if not supported():
        return model
    slots: dict[tuple[int, tuple[int, ...], torch.dtype], int] = {}  # tensor -> arena offset
    size = 0
    for tensor in _tensors(model):
        key = _key(tensor)
        if key not in slots:
            slots[key] = size
            size += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    arena = zeros(size, torch.uint8)
    moved: dict[tuple[int, tuple[int, ...], torch.dtype], torch.Tensor] = {}
    for module in model.modules():
        tables: tuple[dict[str, Any], ...] = (module._parameters, module._buffers)
        for table in tables:
            for name, tensor in table.items():
                if tensor is None or tensor.device.type != "cpu":
                    continue
                key = _key(tensor)
                if key not in moved:
                    offset, nbytes = slots[key], tensor.numel() * tensor.element_size()
                    target = arena[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
                    target.copy_(tensor.contiguous())
                    moved[key] = target
                if isinstance(tensor, nn.Parameter):
                    tensor.data = moved[key]
                else:
                    table[name] = moved[key]
    return model


def release_freed_memory() -> None:
    """Hand free heap pages back to the OS (glibc malloc_trim): what loading left behind."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(None).malloc_trim(0)


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t for module in model.modules()
            for t in (*module._parameters.values(), *module._buffers.values())
            if t is not None and t.device.type == "cpu"]


def _key(tensor: torch.Tensor) -> tuple[int, tuple[int, ...], torch.dtype]:
    return tensor.data_ptr(), tuple(tensor.shape), tensor.dtype
