"""CUDA graphs of decode-only forward passes (the model runner's fast path on CUDA).

At start, one graph per batch size of a ladder up to max_num_seqs is captured over static
input buffers; a decode-only step pads its batch to the next captured size, copies its
inputs into the buffers (two host-to-device copies) and replays. Attention metadata lives
in those buffers too, so each graph is one replay of every layer's kernels with no launch
overhead. Padding rows attend to one position of block 0 and write their K/V into a
scratch block past the scheduler's blocks; their outputs are dropped.

Steps a graph cannot hold (prefill tokens, LoRA adapters, image embeddings, more decodes
than the largest graph) run eagerly: `run` returns None for them.

With `capture=False` (CPU tests) nothing is captured and `run` calls the model on the
static buffers directly, which checks the padding and buffer plumbing without a GPU.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from kvflow.model.attention import AttentionMetadata
from kvflow.model.triton_attention import PagedKernelMetadata

logger = logging.getLogger(__name__)

_IDS, _POSITIONS, _SLOTS, _SEQ_LENS = range(4)  # rows of the small static buffer


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes captured: 1, 2, 4, 8, then every 16 up to max_num_seqs (included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted(set(sizes) | {max_num_seqs})


class DecodeGraphs:
    """Captured decode steps of one model over one set of KV caches."""

    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], block_size: int,
                 max_num_seqs: int, max_model_len: int, scratch_block: int,
                 capture: bool = True) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        self.capture_enabled = capture
        device = kv_caches[0].device
        self.width = -(-max_model_len // block_size)  # block-table columns
        largest = self.sizes[-1]
        # Host staging (pinned on CUDA, so the copies are asynchronous) and device buffers:
        # small [4, B] = ids, positions, slots, seq_lens; tables [B, W].
        pin = device.type == "cuda"
        self.host_small = torch.zeros((4, largest), dtype=torch.long, pin_memory=pin)
        self.host_tables = torch.zeros((largest, self.width), dtype=torch.long, pin_memory=pin)
        self.scratch_slot = scratch_block * block_size
        self.host_small[_SLOTS] = self.scratch_slot
        self.host_small[_SEQ_LENS] = 1
        self.small = self.host_small.to(device)  # [4, B]
        self.tables = self.host_tables.to(device)  # [B, W]
        self.token_indices = torch.arange(largest, device=device)  # [B]
        self.no_prefill = torch.zeros(0, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def metadata(self, size: int) -> AttentionMetadata:
        """Attention metadata of a padded batch of `size` decodes, all in static buffers.

        The split-K partition count follows max_model_len (fixed for the graph), so its
        partitions past a request's length do nothing.
        """
        kernel = PagedKernelMetadata(
            decode_token_indices=self.token_indices[:size],
            decode_seq_lens=self.small[_SEQ_LENS, :size],
            decode_block_tables=self.tables[:size],
            max_decode_seq_len=self.max_model_len,
            prefill_query_starts=self.no_prefill, prefill_query_lens=self.no_prefill,
            prefill_seq_lens=self.no_prefill,
            prefill_block_tables=self.no_prefill.view(0, self.width),
            max_prefill_query_len=0,
        )
        return AttentionMetadata(size, self.small[_SLOTS, :size], [], [], kernel=kernel)

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.small[_IDS, :size], self.small[_POSITIONS, :size],
                          self.kv_caches, self.metadata(size))  # [size, hidden]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first (the smaller ones reuse its memory pool)."""
        if not self.capture_enabled:
            return
        device = self.kv_caches[0].device
        torch.cuda.synchronize(device)
        free_before = torch.cuda.mem_get_info(device)[0]
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up: Triton compiles, the allocator settles
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize(device)
        used = free_before - torch.cuda.mem_get_info(device)[0]
        logger.info("captured %d CUDA graphs (decode batches %d..%d) in %.1f s, %.0f MiB",
                    len(self.sizes), self.sizes[0], self.sizes[-1],
                    time.perf_counter() - start, used / 2**20)

    def padded_size(self, num_decodes: int) -> int | None:
        """The smallest captured size holding `num_decodes`, None above the largest."""
        for size in self.sizes:
            if size >= num_decodes:
                return size
        return None

    def run(self, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
            input_ids: torch.Tensor) -> torch.Tensor | None:
        """Hidden states [n, hidden] of a decode-only step (input_ids [n] on the host), or
        None where a graph cannot hold the step (the caller then runs it eagerly)."""
        n = len(query_lens)
        size = self.padded_size(n)
        if size is None or any(q != 1 for q in query_lens) \
                or any(len(table) > self.width for table in block_tables):
            return None
        if self.capture_enabled and size not in self.graphs:
            return None
        small = self.host_small.numpy()  # [4, B] views of the pinned staging buffers
        tables = self.host_tables.numpy()  # [B, W]
        lens = np.asarray(seq_lens, dtype=np.int64)
        small[_IDS, :n] = input_ids.numpy()
        small[_POSITIONS, :n] = lens - 1
        small[_SEQ_LENS, :n] = lens
        for row, table in enumerate(block_tables):
            tables[row, :len(table)] = table
        last = lens - 1
        small[_SLOTS, :n] = tables[np.arange(n), last // self.block_size] * self.block_size \
            + last % self.block_size
        # padding rows: token 0 at position 0, one position of block 0, K/V to the scratch
        small[_IDS:_POSITIONS + 1, n:size] = 0
        small[_SLOTS, n:size] = self.scratch_slot
        small[_SEQ_LENS, n:size] = 1
        tables[n:size, 0] = 0
        self.small.copy_(self.host_small, non_blocking=True)
        self.tables[:size].copy_(self.host_tables[:size], non_blocking=True)
        if not self.capture_enabled:
            return self._forward(size)[:n]
        self.graphs[size].replay()
        return self.outputs[size][:n]
