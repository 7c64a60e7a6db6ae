"""Memory at engine start: the GPU's share for the KV cache, and the CPU heap's thresholds."""

from __future__ import annotations

import ctypes
import logging
import sys

import torch

from kvflow.config import EngineConfig

logger = logging.getLogger(__name__)


class CudaMemory:
    """GPU memory at engine start, to size the KV cache as vLLM does.

    gpu_memory_utilization is this engine's share of the whole GPU: its weights, its peak
    activations (from a profiled step), what CUDA and libraries take outside torch's
    allocator, and the KV cache together stay within that fraction of total memory. Memory
    held by other engines or processes does not shrink the share; the GPU must only have it
    free at start.
    """

    def __init__(self, device: torch.device, free: int, total: int) -> None:
        self.device, self.free, self.total = device, free, total
        self.allocated = torch.cuda.memory_allocated(device)
        self.reserved = torch.cuda.memory_reserved(device)

    @classmethod
    def at_start(cls, config: EngineConfig) -> CudaMemory:
        device = config.model_config.device
        torch.cuda.empty_cache()  # this process's cached, unused blocks count as free
        torch.cuda.reset_peak_memory_stats(device)
        free, total = torch.cuda.mem_get_info(device)
        wanted = config.cache_config.gpu_memory_utilization * total
        if free < wanted:
            raise ValueError(
                f"the GPU has {free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB at start, "
                f"less than gpu_memory_utilization={config.cache_config.gpu_memory_utilization} "
                f"asks for ({wanted / 2**30:.2f} GiB): lower it or free the GPU")
        return cls(device, free, total)

    def kv_budget(self, utilization: float, temporary: int) -> float:
        """Bytes left for the KV cache once weights and the profiled peak step are counted.

        `temporary`: bytes the profiled step held that the KV cache will take the place of.
        """
        peak = torch.cuda.max_memory_allocated(self.device) - self.allocated - temporary
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        outside_torch = max(0, (self.free - free)
                            - (torch.cuda.memory_reserved(self.device) - self.reserved))
        return utilization * self.total - peak - outside_torch


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def settle_on(device: torch.device) -> None:
    """Prepare this process to run on `device`: on a CPU keep freed memory in the heap; a
    numbered GPU (a data-parallel replica's or tensor-parallel rank's own) becomes current."""
    if device.type == "cpu":
        keep_freed_memory()
    elif device.index is not None:
        torch.cuda.set_device(device)


def keep_freed_memory() -> None:
    """Keep large freed blocks in the process heap instead of unmapping them.

    glibc serves allocations above a threshold (at most 32 MiB) with mmap and unmaps them on
    free, so every step's tens of MB of temporaries (gathered K/V, activations) come back as
    fresh pages the kernel must fault in and zero: a decode step's K/V gather ran 5-7x
    slower that way here. Raising both thresholds makes the heap keep and reuse that memory;
    the resident size then stays at the step's peak instead of going up and down.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return
    if not (mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)):
        logger.debug("mallopt refused the heap thresholds; large temporaries stay mmap-backed")
