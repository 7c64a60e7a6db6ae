"""Paged attention through Triton kernels: decodes and prefills read K/V in place.

The default attention on CUDA (see kvflow.model.attention_backends). The kernels live in
kvflow.model.triton_kernels, imported on first use, so kvflow imports without triton. On a
CPU they run only under Triton's interpreter (TRITON_INTERPRET=1 set before that first use),
which the tests do to check the kernels' logic on machines without a GPU.

Where the torch path gathers each decode group's blocks into a padded copy and masks it, the
decode kernel walks each request's block table up to its length (flash-decoding: long
contexts are split into partitions attended in parallel, then combined by a reduce kernel);
the prefill kernel does the same for a chunk of new tokens over earlier chunks and prefix-
cache hits, causally, with no copy of the context.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType

import torch

# Tile sizes: key positions per inner step, query rows (tokens x GQA group) per prefill
# program, and context positions per split-K partition of a decode.
BLOCK_N = 64
BLOCK_M = 64
PARTITION_SIZE = 512
_LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read when kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device) -> bool:
    """Triton is installed and can run on `device` (a CPU only under the interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def _kernels() -> ModuleType:
    from kvflow.model import triton_kernels

    return triton_kernels


@dataclass(slots=True)
class PagedKernelMetadata:
    """A step's requests as the kernels read them: int32 tensors on the model's device.

    Requests with one new token are decodes, the others prefills (chunks included); block
    tables are padded with block 0, which the kernels never read past a request's length.
    """

    decode_token_indices: torch.Tensor  # [D] flat-batch index of each decode token
    decode_seq_lens: torch.Tensor  # [D] context length, the new token included
    decode_block_tables: torch.Tensor  # [D, W]
    max_decode_seq_len: int
    prefill_query_starts: torch.Tensor  # [P] flat-batch index of each prefill's first token
    prefill_query_lens: torch.Tensor  # [P]
    prefill_seq_lens: torch.Tensor  # [P]
    prefill_block_tables: torch.Tensor  # [P, W]
    max_prefill_query_len: int
    partition_size: int = PARTITION_SIZE  # decode split-K partition (tokens)
    window: int = 0  # sliding window in tokens; 0 = whole context

    @property
    def num_decodes(self) -> int:
        return int(self.decode_seq_lens.shape[0])

    @property
    def num_prefills(self) -> int:
        return int(self.prefill_seq_lens.shape[0])


def build_kernel_metadata(
    table: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    starts: torch.Tensor,
    device: torch.device,
    partition_size: int = PARTITION_SIZE,
    window: int = 0,
) -> PagedKernelMetadata:
    """From host tensors (table [R, W], the rest [R]), with one copy to the device."""
    if partition_size < 1 or window < 0:
        raise ValueError("partition_size must be >= 1 and window >= 0")
    is_decode = query_lens == 1  # [R]
    dec, pre = is_decode.nonzero().flatten(), (~is_decode).nonzero().flatten()
    width = table.shape[1]
    parts = [starts[dec], seq_lens[dec], starts[pre], query_lens[pre], seq_lens[pre],
             table[dec].flatten(), table[pre].flatten()]
    packed = torch.cat(parts).to(torch.int32)  # every field, one host-to-device transfer
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    else:
        packed = packed.to(device)
    fields = packed.split([len(p) for p in parts])
    num_dec, num_pre = len(dec), len(pre)
    return PagedKernelMetadata(
        decode_token_indices=fields[0], decode_seq_lens=fields[1],
        decode_block_tables=fields[5].view(num_dec, width),
        max_decode_seq_len=int(seq_lens[dec].max()) if num_dec else 0,
        prefill_query_starts=fields[2], prefill_query_lens=fields[3],
        prefill_seq_lens=fields[4], prefill_block_tables=fields[6].view(num_pre, width),
        max_prefill_query_len=int(query_lens[pre].max()) if num_pre else 0,
        partition_size=partition_size, window=window,
    )


def paged_attention_triton(
    query: torch.Tensor, kv_cache: torch.Tensor, metadata: PagedKernelMetadata, scale: float
) -> torch.Tensor:
    """query [T, H, hd] (K/V of the step already in kv_cache) -> output [T, H, hd]."""
    output = torch.empty_like(query)  # [T, H, hd]; every row is a decode or a prefill token
    if metadata.num_prefills:
        prefill_attention(query, kv_cache, metadata, scale, output)
    if metadata.num_decodes:
        decode_attention(query, kv_cache, metadata, scale, output)
    return output


def _common(query: torch.Tensor, kv_cache: torch.Tensor) -> dict[str, object]:
    """Arguments both kernels take: cache strides, head geometry and dot precision."""
    if query.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("paged attention kernels need a unit stride on head_dim")
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    key_cache = kv_cache[0]  # [num_blocks, block_size, KvH, hd]
    return dict(
        block_size=key_cache.shape[1], stride_block=key_cache.stride(0),
        stride_row=key_cache.stride(1), stride_head=key_cache.stride(2),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        HEAD_PAD=max(16, _kernels().next_power_of_2(head_dim)),
        # bfloat16 dots are wrong in the interpreter (see triton_kernels); float32 models
        # get full-precision dots on the GPU (tf32 would flip greedy near-ties).
        UPCAST=interpreting() and kv_cache.dtype == torch.bfloat16,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )


def decode_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, metadata: PagedKernelMetadata, scale: float,
    output: torch.Tensor, block_n: int = BLOCK_N,
) -> None:
    """Single-token queries, written into their rows of output [T, H, hd]."""
    kernels = _kernels()
    common = _common(query, kv_cache)
    num_decodes, num_heads = metadata.num_decodes, query.shape[1]
    num_kv_heads = kv_cache.shape[3]
    partition = kernels.cdiv(metadata.partition_size, block_n) * block_n
    num_partitions = max(1, kernels.cdiv(metadata.max_decode_seq_len, partition))
    split = num_partitions > 1
    head_pad = common["HEAD_PAD"]
    assert isinstance(head_pad, int)
    if split:  # unnormalized partials of every (decode, head, partition)
        part_acc = query.new_empty((num_decodes, num_heads, num_partitions, head_pad),
                                   dtype=torch.float32)
        part_max = query.new_empty((num_decodes, num_heads, num_partitions),
                                   dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
    else:  # unused: the kernel stores its normalized output directly
        part_acc = part_max = part_sum = output
    group = common["GROUP"]
    assert isinstance(group, int)
    kernels.paged_decode_kernel[(num_decodes, num_kv_heads, num_partitions)](
        query, kv_cache[0], kv_cache[1], metadata.decode_block_tables, metadata.decode_seq_lens,
        metadata.decode_token_indices, output, part_acc, part_max, part_sum,
        scale * _LOG2E, metadata.window, common["block_size"], num_heads, num_partitions,
        query.stride(0), query.stride(1), output.stride(0), output.stride(1),
        common["stride_block"], common["stride_row"], common["stride_head"],
        metadata.decode_block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, kernels.next_power_of_2(group)),
        HEAD_DIM=common["HEAD_DIM"], HEAD_PAD=head_pad, BLOCK_N=block_n, PARTITION=partition,
        SPLIT=split, UPCAST=common["UPCAST"], PRECISION=common["PRECISION"],
    )
    if split:
        kernels.paged_decode_reduce_kernel[(num_decodes, num_heads)](
            part_acc, part_max, part_sum, metadata.decode_token_indices, output,
            num_heads, num_partitions, output.stride(0), output.stride(1),
            HEAD_DIM=common["HEAD_DIM"], HEAD_PAD=head_pad,
            PART_PAD=kernels.next_power_of_2(num_partitions),
        )


def prefill_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, metadata: PagedKernelMetadata, scale: float,
    output: torch.Tensor, block_m: int = BLOCK_M, block_n: int = BLOCK_N,
) -> None:
    """Multi-token queries (each request's new tokens contiguous in the flat batch)."""
    kernels = _kernels()
    common = _common(query, kv_cache)
    group = common["GROUP"]
    assert isinstance(group, int)
    block_m = max(block_m, kernels.next_power_of_2(group))
    tokens_per_tile = block_m // group
    grid = (metadata.num_prefills, kernels.cdiv(metadata.max_prefill_query_len, tokens_per_tile),
            kv_cache.shape[3])
    kernels.paged_prefill_kernel[grid](
        query, kv_cache[0], kv_cache[1], metadata.prefill_block_tables,
        metadata.prefill_seq_lens, metadata.prefill_query_starts, metadata.prefill_query_lens,
        output, scale * _LOG2E, metadata.window, common["block_size"],
        query.stride(0), query.stride(1), output.stride(0), output.stride(1),
        common["stride_block"], common["stride_row"], common["stride_head"],
        metadata.prefill_block_tables.stride(0),
        GROUP=group, HEAD_DIM=common["HEAD_DIM"], HEAD_PAD=common["HEAD_PAD"],
        BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=common["UPCAST"],
        PRECISION=common["PRECISION"],
    )
