"""The Triton paged-attention kernels against plain torch attention and the torch path.

Without a GPU they run in Triton's interpreter (tests/conftest.py turns it on), so shapes
stay small: the point is the index math (block tables, ragged lengths, GQA groups, split-K
partitions, causal chunks after context), which the interpreter executes exactly.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kvflow.model import triton_attention  # noqa: E402
from kvflow.model.attention import build_attention_metadata, paged_attention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KV_HEADS, HEAD_DIM = 2, 32


class Step:
    """A random KV cache and a step over it: unused slots hold NaN, tables are shuffled."""

    def __init__(self, query_lens: list[int], seq_lens: list[int], block_size: int, group: int,
                 head_dim: int = HEAD_DIM, dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        need = [-(-s // block_size) for s in seq_lens]
        num_blocks = sum(need) + 3
        self.block_size, self.group, self.head_dim = block_size, group, head_dim
        self.query_lens, self.seq_lens = query_lens, seq_lens
        order = torch.randperm(num_blocks, generator=generator).tolist()
        self.tables = [order[sum(need[:i]):sum(need[:i + 1])] for i in range(len(need))]
        self.cache = torch.full((2, num_blocks, block_size, KV_HEADS, head_dim), float("nan"))
        for table, seq_len in zip(self.tables, seq_lens, strict=True):
            for pos in range(seq_len):
                self.cache[:, table[pos // block_size], pos % block_size] = torch.randn(
                    2, KV_HEADS, head_dim, generator=generator)
        self.cache = self.cache.to(DEVICE, dtype)
        heads = KV_HEADS * group
        self.query = torch.randn(sum(query_lens), heads, head_dim, generator=generator)
        self.query = self.query.to(DEVICE, dtype)
        self.scale = head_dim**-0.5

    def metadata(self, partition_size: int = 512,
                 window: int = 0) -> triton_attention.PagedKernelMetadata:
        width = max(len(t) for t in self.tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in self.tables])
        query_lens = torch.tensor(self.query_lens)
        starts = torch.cumsum(query_lens, 0) - query_lens
        return triton_attention.build_kernel_metadata(
            table, query_lens, torch.tensor(self.seq_lens), starts, DEVICE, partition_size,
            window)

    def reference(self, window: int = 0) -> torch.Tensor:
        """Plain float32 softmax attention, request by request, over slots read one by one."""
        out = torch.empty(self.query.shape, dtype=torch.float32)  # [T, H, hd]
        start = 0
        cache = self.cache.float().cpu()
        for query_len, seq_len, table in zip(self.query_lens, self.seq_lens, self.tables,
                                              strict=True):
            positions = torch.arange(seq_len)
            blocks = torch.tensor(table)[positions // self.block_size]
            k = cache[0, blocks, positions % self.block_size]  # [S, KvH, hd]
            v = cache[1, blocks, positions % self.block_size]  # [S, KvH, hd]
            k, v = (x.repeat_interleave(self.group, dim=1) for x in (k, v))  # [S, H, hd]
            q = self.query[start:start + query_len].float().cpu()  # [Q, H, hd]
            scores = torch.einsum("qhd,shd->hqs", q, k) * self.scale  # [H, Q, S]
            query_pos = torch.arange(seq_len - query_len, seq_len)  # [Q]
            visible = positions[None, :] <= query_pos[:, None]  # [Q, S]
            if window:
                visible &= positions[None, :] > query_pos[:, None] - window
            scores = scores.masked_fill(~visible, float("-inf"))
            out[start:start + query_len] = torch.einsum("hqs,shd->qhd", scores.softmax(-1), v)
            start += query_len
        return out

    def run(self, metadata: triton_attention.PagedKernelMetadata, block_m: int = 32,
            block_n: int = 32) -> torch.Tensor:
        output = torch.full_like(self.query, float("nan"))
        if metadata.num_prefills:
            triton_attention.prefill_attention(self.query, self.cache, metadata, self.scale,
                                               output, block_m=block_m, block_n=block_n)
        if metadata.num_decodes:
            triton_attention.decode_attention(self.query, self.cache, metadata, self.scale,
                                              output, block_n=block_n)
        return output.float().cpu()


# Ragged decodes: one token, a block edge, several blocks, many blocks.
DECODE_LENS = [1, 16, 45, 130]


@pytest.mark.parametrize(("block_size", "group", "partition_size"), [
    (16, 1, 512), (16, 3, 32), (16, 4, 512), (32, 1, 32), (32, 3, 512), (32, 4, 32)])
def test_decode_matches_reference(block_size: int, group: int, partition_size: int) -> None:
    step = Step([1] * len(DECODE_LENS), DECODE_LENS, block_size, group)
    metadata = step.metadata(partition_size)
    assert metadata.num_decodes == 4 and metadata.num_prefills == 0
    torch.testing.assert_close(step.run(metadata), step.reference(), atol=2e-5, rtol=1e-4)


# A fresh prompt, a chunk after an earlier chunk, a prefix-cache hit ending on a block edge,
# and a chunk whose context spans many blocks, each with a decode in between.
PREFILL_QUERY_LENS = [19, 1, 13, 1, 5, 24]
PREFILL_SEQ_LENS = [19, 40, 50, 7, 37, 130]


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_prefill_after_context_matches_reference(block_size: int, group: int) -> None:
    step = Step(PREFILL_QUERY_LENS, PREFILL_SEQ_LENS, block_size, group)
    metadata = step.metadata(partition_size=32)
    assert metadata.num_prefills == 4 and metadata.max_prefill_query_len == 24
    torch.testing.assert_close(step.run(metadata), step.reference(), atol=2e-5, rtol=1e-4)


def test_sliding_window_matches_reference() -> None:
    step = Step(PREFILL_QUERY_LENS, PREFILL_SEQ_LENS, 16, 3)
    for window in (1, 40):
        metadata = step.metadata(partition_size=32, window=window)
        torch.testing.assert_close(step.run(metadata), step.reference(window), atol=2e-5,
                                   rtol=1e-4)


def test_odd_block_size_and_head_dim() -> None:
    """Block sizes and head dims that are not powers of two (tiles span blocks, heads pad)."""
    step = Step(PREFILL_QUERY_LENS, PREFILL_SEQ_LENS, 12, 2, head_dim=24)
    metadata = step.metadata(partition_size=40)
    torch.testing.assert_close(step.run(metadata, block_m=16, block_n=16), step.reference(),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_cache_tracks_float32(dtype: torch.dtype) -> None:
    step = Step(PREFILL_QUERY_LENS, PREFILL_SEQ_LENS, 16, 3, dtype=dtype)
    output = step.run(step.metadata(partition_size=32))
    assert not output.isnan().any()
    torch.testing.assert_close(output, step.reference(), atol=3e-2, rtol=3e-2)


def test_engine_entry_point_matches_the_torch_path() -> None:
    """paged_attention with kernel metadata writes the step's K/V and attends like the
    torch path, in the flat batch's order (decodes and prefills interleaved)."""
    query_lens, seq_lens = [1, 6, 1, 17], [30, 6, 9, 49]
    step = Step(query_lens, seq_lens, 16, 3)
    key = torch.randn(sum(query_lens), KV_HEADS, HEAD_DIM, device=DEVICE)
    value = torch.randn(sum(query_lens), KV_HEADS, HEAD_DIM, device=DEVICE)
    outputs = []
    for paged_kernel in (False, True):
        cache = step.cache.clone().nan_to_num_()  # the torch path's SDPA needs finite padding
        metadata = build_attention_metadata(query_lens, seq_lens, step.tables, 16, DEVICE,
                                            paged_kernel=paged_kernel)
        assert (metadata.kernel is not None) == paged_kernel
        outputs.append(paged_attention(step.query, key, value, cache, metadata, step.scale))
        outputs.append(cache)
    torch_out, torch_cache, kernel_out, kernel_cache = outputs
    torch.testing.assert_close(kernel_cache, torch_cache, rtol=0, atol=0)
    torch.testing.assert_close(kernel_out, torch_out, atol=2e-5, rtol=1e-4)


def test_kernel_metadata_splits_decodes_from_prefills() -> None:
    metadata = build_attention_metadata([3, 1, 1, 4], [3, 20, 9, 10],
                                        [[5], [1, 2], [7], [3]], 16, DEVICE, paged_kernel=True)
    kernel = metadata.kernel
    assert kernel is not None and not metadata.prefills and not metadata.decodes
    assert kernel.decode_token_indices.tolist() == [3, 4]
    assert kernel.decode_seq_lens.tolist() == [20, 9] and kernel.max_decode_seq_len == 20
    assert kernel.decode_block_tables.tolist() == [[1, 2], [7, 0]]
    assert kernel.prefill_query_starts.tolist() == [0, 5]
    assert kernel.prefill_query_lens.tolist() == [3, 4] and kernel.max_prefill_query_len == 4
    assert kernel.prefill_seq_lens.tolist() == [3, 10]
    assert kernel.prefill_block_tables.tolist() == [[5, 0], [3, 0]]
    assert kernel.decode_seq_lens.dtype == torch.int32
    with pytest.raises(ValueError):
        triton_attention.build_kernel_metadata(torch.zeros(1, 1, dtype=torch.long),
                                               torch.ones(1, dtype=torch.long),
                                               torch.ones(1, dtype=torch.long),
                                               torch.zeros(1, dtype=torch.long), DEVICE,
                                               partition_size=0)


@pytest.mark.slow
def test_long_contexts_over_many_blocks() -> None:
    """Contexts of ~100 blocks, split into many partitions, and a long chunk after them."""
    step = Step([1, 1, 1, 40], [1500, 999, 17, 1300], 16, 4, seed=1)
    torch.testing.assert_close(step.run(step.metadata(partition_size=128), block_n=64),
                               step.reference(), atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_shapes_match_the_torch_path(dtype: torch.dtype) -> None:
    """The default model's head layout (9 heads over 3, head_dim 64) with the GPU's tile
    sizes: 64 decodes of up to 2,000 tokens and 4 prefill chunks after context."""
    generator = torch.Generator().manual_seed(0)
    seq_lens = torch.randint(1, 2000, (64,), generator=generator).tolist() + [300, 64, 900, 33]
    query_lens = [1] * 64 + [300, 20, 128, 33]
    block_size, num_kv_heads, heads, head_dim = 16, 3, 9, 64
    need = [-(-s // block_size) for s in seq_lens]
    order = torch.randperm(sum(need), generator=generator).tolist()
    tables = [order[sum(need[:i]):sum(need[:i + 1])] for i in range(len(need))]
    cache = torch.randn(2, sum(need), block_size, num_kv_heads, head_dim, device=DEVICE,
                        dtype=dtype)
    num_tokens = sum(query_lens)
    query = torch.randn(num_tokens, heads, head_dim, device=DEVICE, dtype=dtype)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE, dtype=dtype)
    value = torch.randn_like(key)
    outputs = []
    for paged_kernel in (False, True):
        metadata = build_attention_metadata(query_lens, seq_lens, tables, block_size, DEVICE,
                                            paged_kernel=paged_kernel)
        outputs.append(paged_attention(query, key, value, cache, metadata, head_dim**-0.5))
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(outputs[1], outputs[0], atol=tolerance, rtol=tolerance)


# Compiles the kernels for a Hopper GPU (sm_90) with Triton's bundled ptxas, no GPU needed:
# the compiled front end checks what the interpreter does not (constexpr globals, operand
# types, minimum dot shapes). Run in a subprocess, since this session interprets.
_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvflow.model import triton_kernels as K

def build(fn, types, consts):
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    triton.compile(ASTSource(fn, signature, constexprs=consts),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

pointers = {n: "*bf16" for n in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
pointers |= {n: "*i32" for n in ("block_tables_ptr", "seq_lens_ptr", "token_indices_ptr",
                                 "query_starts_ptr", "query_lens_ptr")}
pointers |= {n: "*fp32" for n in ("part_acc_ptr", "part_max_ptr", "part_sum_ptr")}
pointers["qk_scale"] = "fp32"
build(K.paged_decode_kernel, pointers, dict(GROUP=3, GROUP_PAD=16, HEAD_DIM=64, HEAD_PAD=64,
      BLOCK_N=64, PARTITION=512, SPLIT=True, UPCAST=False, PRECISION="tf32"))
build(K.paged_decode_reduce_kernel, pointers, dict(HEAD_DIM=64, HEAD_PAD=64, PART_PAD=16))
build(K.paged_prefill_kernel, pointers, dict(GROUP=7, HEAD_DIM=64, HEAD_PAD=64, BLOCK_M=64,
      BLOCK_N=64, UPCAST=False, PRECISION="tf32"))
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper() -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True,
                          text=True, timeout=600)
    if "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("Triton's bundled ptxas is missing")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
