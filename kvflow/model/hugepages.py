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
from collections.abc import Callable, Hashable
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
    if not supported():
        return torch.zeros(numel, dtype=dtype)
    return _untouched(numel * dtype.itemsize).view(dtype).zero_()


def _untouched(nbytes: int) -> torch.Tensor:
    """`nbytes` of fresh huge-page-advised memory as a uint8 tensor, 2 MiB aligned, no page
    touched yet: it costs nothing resident until written."""
    # Private anonymous memory: THP's `enabled` setting governs it (shared memory would
    # follow `shmem_enabled`). The tensor keeps the mapping alive.
    area = mmap.mmap(-1, max(nbytes, 1) + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(area, dtype=torch.uint8)
    start = (-raw.data_ptr()) % _HUGE
    return raw[start:start + nbytes]


def materialize_(model: nn.Module) -> nn.Module:
    """`model.to_empty(device="cpu")` into one huge-page arena: every meta parameter and
    buffer gets uninitialized storage there, so loading then writes each weight straight
    into its final home (no second copy of the weights, not even for a moment).

    A Parameter held by two modules is still one Parameter after. Without huge-page
    support the arena is ordinary memory.
    """
    entries = [(table, name, t) for table, name, t in _entries(model) if t.device.type == "meta"]
    offsets, size = _layout([t for _, _, t in entries], id)  # meta tensors share no storage
    arena = _untouched(size) if supported() else torch.empty(size, dtype=torch.uint8)
    placed: dict[int, torch.Tensor] = {}
    for table, name, tensor in entries:
        if id(tensor) not in placed:
            storage = _view(arena, offsets[id(tensor)], tensor)
            placed[id(tensor)] = (nn.Parameter(storage, requires_grad=tensor.requires_grad)
                                  if isinstance(tensor, nn.Parameter) else storage)
        table[name] = placed[id(tensor)]
    return model


def move_to_hugepages_(model: nn.Module) -> nn.Module:
    """Copy every parameter and buffer of a CPU model into one huge-page arena, in place.

    Tensors that share storage (a tied head over the embedding table) stay shared. The
    arena's pages become resident only as they are written (quantized models take this path;
    float models are built in an arena by `materialize_`)."""
    if not supported():
        return model
    entries = [(table, name, t) for table, name, t in _entries(model) if t.device.type == "cpu"]
    slots, size = _layout([t for _, _, t in entries], _key)
    arena = _untouched(size)
    moved: dict[Hashable, torch.Tensor] = {}
    for table, name, tensor in entries:
        key = _key(tensor)
        if key not in moved:
            moved[key] = _view(arena, slots[key], tensor).copy_(tensor)
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


def _entries(model: nn.Module) -> list[tuple[dict[str, Any], str, torch.Tensor]]:
    """(table, name, tensor) for every parameter and buffer slot of every module."""
    return [(table, name, tensor) for module in model.modules()
            for table in (module._parameters, module._buffers)
            for name, tensor in table.items() if tensor is not None]


def _layout(tensors: list[torch.Tensor], key: Callable[[torch.Tensor], Hashable]
            ) -> tuple[dict[Hashable, int], int]:
    """Arena offset of each distinct key (tensors with equal keys share a slot), and the
    arena's size; slots are _ALIGN-byte aligned."""
    offsets: dict[Hashable, int] = {}
    size = 0
    for tensor in tensors:
        if key(tensor) not in offsets:
            offsets[key(tensor)] = size
            size += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    return offsets, size


def _view(arena: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    nbytes = like.numel() * like.element_size()
    return arena[offset:offset + nbytes].view(like.dtype).view(like.shape)


def _key(tensor: torch.Tensor) -> tuple[int, tuple[int, ...], torch.dtype]:
    return tensor.data_ptr(), tuple(tensor.shape), tensor.dtype
