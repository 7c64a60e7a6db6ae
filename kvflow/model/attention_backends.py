"""Attention backends by name: each builds the step's AttentionMetadata its kernels read.

    cpu     the C kernels of kvflow.model.cpu_kernels (decodes, rotary, cache write)
    torch   pure torch: gathered, masked SDPA (any device; CUDA without triton)
    triton  the Triton kernels of kvflow.model.triton_attention (CUDA; a CPU only under
            TRITON_INTERPRET=1, for tests)

`attention_backend=None` picks, at start, cpu on a CPU where the C kernels load (float32 or
bfloat16), triton on CUDA where triton is installed, else torch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from kvflow.model import cpu_kernels, triton_attention
from kvflow.model.attention import AttentionMetadata, build_attention_metadata

# (query_lens, seq_lens, block_tables, block_size, device) -> metadata
MetadataBuilder = Callable[[list[int], list[int], list[list[int]], int, torch.device],
                           AttentionMetadata]

ATTENTION_BACKENDS: dict[str, Callable[[], MetadataBuilder]] = {
    "cpu": lambda: functools.partial(build_attention_metadata, cpu_kernel=True),
    "torch": lambda: build_attention_metadata,
    "triton": lambda: functools.partial(build_attention_metadata, paged_kernel=True),
}


def check_attention_backend(name: str | None, device: torch.device) -> None:
    """Refuse (ValueError) a backend that cannot run on `device`."""
    if name is None:
        return
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; "
                         f"got {name!r}")
    if name == "cpu" and device.type != "cpu":
        raise ValueError("attention_backend 'cpu' (the C kernels) runs on a CPU only")
    if name == "triton" and not triton_attention.available(device):
        raise ValueError("attention_backend 'triton' needs the triton package, and on a CPU "
                         "its interpreter (TRITON_INTERPRET=1; slow, for tests)")


def select_attention_backend(name: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The backend a runner uses: `name` if given (checked), else the fastest that runs."""
    check_attention_backend(name, device)
    if name == "cpu" and (dtype not in (torch.float32, torch.bfloat16)
                          or cpu_kernels.load() is None):
        raise ValueError("attention_backend 'cpu' needs float32 or bfloat16 and the C kernels "
                         "built (python -m kvflow.model.cpu_kernels)")
    if name is not None:
        return name
    if device.type == "cpu":
        fits = dtype in (torch.float32, torch.bfloat16) and cpu_kernels.load() is not None
        return "cpu" if fits else "torch"
    return "triton" if triton_attention.available(device) else "torch"
