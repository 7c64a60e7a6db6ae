"""A draft model that proposes tokens: a small model with the target's tokenizer, run in
the engine core with its own paged KV cache.

The draft's cache has as many blocks as the target's and is indexed by the same block
tables: a request's position p lives in the same block and slot in both caches, so the
scheduler's allocation serves both and no second allocator exists. Each request tracks how
many of its positions hold valid draft K/V (`num_draft_computed`); a proposal round first
catches the draft up to the request's known tokens (the whole prompt after admission or
preemption, else the last token and the accepted proposals), then runs k-1 more one-token
steps, each feeding the draft's own previous guess. Proposals are the draft's argmax:
deterministic, so verification's sample-and-compare rule keeps random rows exact (see
kvflow.spec_decode.verify). A prefix-cache hit skips the target's work, not the draft's:
the draft computes what it has not computed itself, so a shared block's draft K/V is
rewritten with the same values.

A draft that is the target itself (its own folder, quantized: the usual way to get a
cheaper copy when no smaller model shares the tokenizer) keeps no cache: it attends over
the target's K/V, which its own would only approximate, and writes the K/V of its guesses
into the slots verification overwrites next (every verify layer writes the step's K/V
before attending). It then never catches up: a same-size draft catching up on each
prompt, and on the tokens it missed while speculation was off, would cost about as much
as the target's own prefill.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvflow.model import hugepages
from kvflow.model.attention import build_attention_metadata, kv_cache_shape
from kvflow.model.loader import load_hf_config, load_model
from kvflow.spec_decode.config import MAX_SPECULATIVE_TOKENS, SpeculativeConfig
from kvflow.spec_decode.verify import attention_rows

if TYPE_CHECKING:
    from kvflow.config import EngineConfig
    from kvflow.core.kv_cache import KVCacheManager
    from kvflow.core.request import Request
    from kvflow.worker.model_runner import ModelRunner


class DraftModel:
    """The draft's weights and KV cache, and one proposal round for a batch of requests."""

    def __init__(self, config: SpeculativeConfig, engine: EngineConfig,
                 runner: ModelRunner) -> None:
        assert config.model is not None
        mc = engine.model_config
        self.device = mc.device
        self.block_size = runner.block_size
        hf = load_hf_config(config.model)
        self.model = load_model(config.model, mc.dtype, mc.device, config.quantization,
                                hf.to_dict())
        self.runner = runner
        # the target itself, quantized: its K/V serve (see the module's docstring); not
        # under tensor parallelism, where this rank's cache holds only some KV heads
        self.shares_kv = (config.model.resolve() == mc.path.resolve()
                          and runner.parallel is None)
        shape = kv_cache_shape(runner.num_blocks, self.block_size, self.model.num_kv_heads,
                               self.model.head_dim)
        if self.shares_kv:
            self.kv_caches: list[torch.Tensor] = []
        elif self.device.type == "cpu":
            self.kv_caches = [hugepages.zeros(math.prod(shape), mc.dtype).view(shape)
                              for _ in range(self.model.num_layers)]
        else:
            self.kv_caches = [torch.zeros(shape, dtype=mc.dtype, device=self.device)
                              for _ in range(self.model.num_layers)]
        self.cpu_kernel = runner.cpu_kernel
        self.kv: KVCacheManager | None = None  # the core's block manager, set by the core

    @torch.inference_mode()
    def propose(self, requests: list[Request], k: int) -> None:
        """Set each request's spec_token_ids to the draft's k greedy next tokens (fewer
        where its blocks cannot take the draft's positions)."""
        assert self.kv is not None
        kv = self.kv
        requests = [r for r in requests  # (positions past max_model_len: none near the end)
                    if r.num_tokens + k <= r.max_model_len and kv.allocate_slots(r, k)
                    # (after the allocation: the next position's block may be new)
                    and not (self.shares_kv and self._in_cached_block(r))]
        if not requests:
            return
        inputs, starts = [], []
        for r in requests:
            start = r.num_computed_tokens if self.shares_kv \
                else min(r.num_draft_computed, r.num_computed_tokens)
            starts.append(start)
            inputs.append(r.all_token_ids[start:])
        guesses = self._forward(requests, inputs, starts)  # [R]
        proposals = [[g] for g in guesses]
        for step in range(1, k):
            starts = [r.num_tokens + step - 1 for r in requests]
            guesses = self._forward(requests, [[p[-1]] for p in proposals], starts)
            for p, g in zip(proposals, guesses, strict=True):
                p.append(g)
        for r, p in zip(requests, proposals, strict=True):
            r.spec_token_ids = p
            r.num_draft_computed = r.num_tokens + k - 1  # d_k itself was never fed

    def _in_cached_block(self, request: Request) -> bool:
        """Whether the request's next position lies in a prefix-cache block (a resumed
        request can recompute its last token there): other requests may read that block,
        so a guess's K/V must not be written into it."""
        assert self.kv is not None
        block = self.kv.block_ids(request.request_id)[request.num_computed_tokens
                                                      // self.block_size]
        return self.kv.blocks[block].block_hash is not None

    def _forward(self, requests: list[Request], inputs: list[list[int]],
                 starts: list[int]) -> list[int]:
        """One draft forward over each request's `inputs` placed at `starts`; the argmax
        after each request's last input. A short catch-up (the last token and the accepted
        proposals) runs as single-token queries, as verification does, so a step of them
        takes the decode kernels (the C whole-layer path on a CPU) instead of a prefill's."""
        query_lens = [len(x) for x in inputs]
        seq_lens = [s + q for s, q in zip(starts, query_lens, strict=True)]
        assert self.kv is not None
        tables = [self.kv.block_ids(r.request_id) for r in requests]
        rows = attention_rows(query_lens, seq_lens, tables,
                              [q - 1 if q <= MAX_SPECULATIVE_TOKENS + 1 else 0
                               for q in query_lens])
        metadata = build_attention_metadata(*rows, self.block_size, self.device,
                                            cpu_kernel=self.cpu_kernel)
        ids = torch.from_numpy(np.fromiter((t for x in inputs for t in x), dtype=np.int64,
                                           count=sum(query_lens))).to(self.device)  # [T]
        positions = torch.from_numpy(np.concatenate([
            np.arange(s, s + q, dtype=np.int64) for s, q in zip(starts, query_lens, strict=True)
        ])).to(self.device)  # [T]
        caches = self.runner.kv_caches if self.shares_kv else self.kv_caches
        hidden = self.model(ids, positions, caches, metadata)  # [T, hidden]
        last = torch.as_tensor(np.cumsum(query_lens) - 1, device=self.device)  # [R]
        return self.model.compute_logits(hidden[last]).argmax(dim=-1).tolist()
