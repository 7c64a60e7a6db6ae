"""Turns a SchedulerOutput into one forward pass over flat tensors, then samples."""

from __future__ import annotations

import gc
import logging
import math
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from kvflow.config import EngineConfig
from kvflow.core.scheduler import ScheduledRequest, SchedulerOutput, StepResult
from kvflow.engine.protocol import LogprobsLists, WorkerStep
from kvflow.model import hugepages
from kvflow.model.attention import kv_cache_bytes_per_block, kv_cache_shape
from kvflow.model.attention_backends import ATTENTION_BACKENDS, select_attention_backend
from kvflow.model.loader import load_model, load_vision_encoder
from kvflow.sample.metadata import SamplingMetadata
from kvflow.sample.sampler import LogprobsTensors, Sampler, compute_prompt_logprobs
from kvflow.spec_decode.verify import attention_rows, verified_result
from kvflow.worker.cuda_graphs import DecodeGraphs
from kvflow.worker.memory import CudaMemory, settle_on

if TYPE_CHECKING:
    from kvflow.core.request import Request
    from kvflow.lora.manager import LoRASlotTable
    from kvflow.model.llama import LlamaForCausalLM
    from kvflow.structured.manager import StructuredOutputManager
    from kvflow.worker.encoder_runner import EncoderRunner

logger = logging.getLogger(__name__)

# Requests sampled together. Logits, probabilities and the draw's float64 cumulative sum are
# each [rows, vocab] (6-12 MB at 32 rows and a 49k vocabulary): a step of 256 requests
# samples in eight parts, so its working memory is that of a 32-request step.
SAMPLE_ROWS = 32
# On a GPU the whole batch samples at once (1,024 rows of a 152k vocabulary: ~1.9 GB of
# temporaries), so a step copies its sampled ids to the host once instead of once per part.
CUDA_SAMPLE_ROWS = 1024


class TensorParallelRank(Protocol):
    """What the runner of a tensor-parallel rank asks of its group (kvflow.distributed)."""

    def load_model(self, config: EngineConfig) -> LlamaForCausalLM:
        """This rank's shard of the model, hooked into the group's collectives."""

    def agree_num_blocks(self, num_blocks: int) -> int:
        """The smallest KV block count any rank can hold: every rank uses it."""

    def send_step(self, step: WorkerStep) -> None:
        """Rank 0: hand the step's forward inputs to the other ranks."""


class ModelRunner:
    """Owns the model, the KV cache tensors and the sampler of one engine core (or of one
    tensor-parallel rank: `parallel` then loads its shard and, on rank 0, broadcasts each
    step)."""

    def __init__(self, config: EngineConfig, parallel: TensorParallelRank | None = None) -> None:
        mc = config.model_config
        self.config = config
        self.parallel = parallel
        self.device = mc.device
        self.dtype = mc.dtype
        settle_on(self.device)
        self.block_size = config.cache_config.block_size
        self.vocab_size = mc.vocab_size
        start = CudaMemory.at_start(config) if self.device.type == "cuda" else None
        self.model = (load_model(mc.path, mc.dtype, mc.device, mc.quantization, mc.hf_config)
                      if parallel is None else parallel.load_model(config))
        self.encoder_runner = self._encoder_runner(config)
        # cpu: rotary, the cache write and decode attention in C (float32 or bfloat16 on a
        # CPU); triton: paged kernels (CUDA); torch: the pure-torch path.
        self.attention_backend = select_attention_backend(config.attention_backend,
                                                          self.device, self.dtype)
        self.cpu_kernel = self.attention_backend == "cpu"
        self.build_metadata = ATTENTION_BACKENDS[self.attention_backend]()
        self.num_blocks = self._count_blocks(config, start)
        if parallel is not None:
            self.num_blocks = parallel.agree_num_blocks(self.num_blocks)
        # CUDA graphs of decode steps (enforce_eager: none) write their padding rows' K/V
        # into one scratch block past the scheduler's.
        self.use_cuda_graphs = (self.device.type == "cuda" and not config.enforce_eager
                                and self.attention_backend == "triton" and parallel is None
                                and config.lora_config is None and self.encoder_runner is None)
        self.kv_shape = kv_cache_shape(self.num_blocks + int(self.use_cuda_graphs),
                                       self.block_size, self.model.num_kv_heads,
                                       self.model.head_dim)
        self.num_layers = self.model.num_layers
        self.kv_caches = self._allocate_kv_caches()
        self.sampler = Sampler()
        self.lora_slots = self._lora_slots(config)
        self.cuda_graphs = self._capture_cuda_graphs()

    def _capture_cuda_graphs(self) -> DecodeGraphs | None:
        if not self.use_cuda_graphs:
            return None
        sc, mc = self.config.scheduler_config, self.config.model_config
        graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, sc.max_num_seqs,
                              mc.max_model_len, scratch_block=self.num_blocks)
        graphs.capture()
        return graphs

    def _allocate_kv_caches(self) -> list[torch.Tensor]:
        """One zeroed tensor per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]."""
        shape = self.kv_shape
        if self.device.type == "cpu":  # cache in huge pages like the weights; leftovers freed
            caches = [hugepages.zeros(math.prod(shape), self.dtype).view(shape)
                      for _ in range(self.num_layers)]
            hugepages.release_freed_memory()
            return caches
        return [torch.zeros(shape, dtype=self.dtype, device=self.device)
                for _ in range(self.num_layers)]

    # ---- sleep mode ----------------------------------------------------------------------
    def sleep(self, level: int) -> None:
        """Free the KV cache (level 1), and the weights too (level 2): their memory goes
        back to the system (CPU: the huge-page mappings are unmapped)."""
        self.kv_caches = []
        self.cuda_graphs = None  # they hold the cache's (and weights') addresses
        if level >= 2:
            del self.model
            self.encoder_runner = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        else:
            hugepages.release_freed_memory()

    def wake_up(self, tags: set[str]) -> None:
        """Restore what sleep freed: "weights" reloads them from the model folder (the same
        bytes as at start), "kv_cache" allocates a zeroed cache of the same size."""
        if "weights" in tags and not hasattr(self, "model"):
            mc = self.config.model_config
            self.model = load_model(mc.path, mc.dtype, mc.device, mc.quantization, mc.hf_config)
            self.encoder_runner = self._encoder_runner(self.config)
            self.lora_slots = self._lora_slots(self.config)  # hooked into the new layers
        if "kv_cache" in tags and not self.kv_caches:
            self.kv_caches = self._allocate_kv_caches()
        if self.cuda_graphs is None and self.kv_caches and hasattr(self, "model"):
            self.cuda_graphs = self._capture_cuda_graphs()  # over the new addresses

    def _encoder_runner(self, config: EngineConfig) -> EncoderRunner | None:
        """The vision tower of a LLaVA model. On a CPU without bf16 arithmetic it runs in
        float32 (like the decoder's activations there)."""
        mc = config.model_config
        if mc.image_token_id is None:
            return None
        from kvflow.model import cpu_isa
        from kvflow.worker.encoder_runner import EncoderRunner

        dtype = mc.dtype
        if self.device.type == "cpu" and dtype != torch.float32 \
                and not cpu_isa.detect().native_bf16:
            dtype = torch.float32
        encoder = load_vision_encoder(mc.path, dtype, self.device, mc.hf_config)
        assert encoder is not None
        return EncoderRunner(encoder, self.device)

    def _lora_slots(self, config: EngineConfig) -> LoRASlotTable | None:
        """The adapter slots, hooked into every projection LoRA can target."""
        lc = config.lora_config
        if lc is None:
            return None
        from kvflow.lora.manager import LoRASlotTable
        from kvflow.model.llama import LORA_TARGETS

        table = LoRASlotTable(lc.max_loras, lc.max_lora_rank, lc.dtype, self.device)
        self.model.set_lora_hooks(lambda layer, name, in_features, sizes: table.make_hook(
            layer, name, in_features, sizes, LORA_TARGETS[name]))
        return table

    def release_lora(self, lora_id: int) -> None:
        if self.lora_slots is not None:
            self.lora_slots.release(lora_id)

    def _lora_slots_of(self, scheduled: list[ScheduledRequest]) -> list[int] | None:
        """Each request's adapter slot (-1: none), its adapter copied in if needed; None when
        no request of the step has an adapter."""
        if self.lora_slots is None or all(s.request.lora is None for s in scheduled):
            return None
        return self.lora_slots.activate([s.request.lora for s in scheduled])

    def _count_blocks(self, config: EngineConfig, start: CudaMemory | None) -> int:
        cc = config.cache_config
        if cc.num_kv_blocks is not None:
            return cc.num_kv_blocks
        per_block = kv_cache_bytes_per_block(
            self.model.num_layers, self.block_size, self.model.num_kv_heads,
            self.model.head_dim, self.dtype,
        )
        if start is not None:
            temporary = self._profile_peak_step(config)
            budget = start.kv_budget(cc.gpu_memory_utilization, temporary)
        else:
            budget = cc.kv_cache_memory_gb * (1 << 30)
        num_blocks = int(budget // per_block)
        if num_blocks < 1:
            raise ValueError(
                f"no memory left for the KV cache ({budget / 2**30:.2f} GiB available, "
                f"{per_block} bytes per block): raise kv_cache_memory_gb / gpu_memory_utilization"
            )
        return num_blocks

    @torch.inference_mode()
    def _profile_peak_step(self, config: EngineConfig) -> int:
        """Run the largest step the scheduler can send, so the peak allocation is measured.

        A full token budget of prefill in sequences of at most max_model_len, logits for every
        token (prompt logprobs ask for that), one sampling part. Returns the bytes of its
        temporary KV cache, which the peak includes and the real cache will replace.
        """
        num_tokens = config.scheduler_config.max_num_batched_tokens
        longest = config.model_config.max_model_len
        query_lens = [min(longest, num_tokens - first) for first in range(0, num_tokens, longest)]
        blocks = [-(-q // self.block_size) for q in query_lens]
        tables = [list(range(sum(blocks[:i]), sum(blocks[:i + 1]))) for i in range(len(blocks))]
        shape = kv_cache_shape(sum(blocks), self.block_size, self.model.num_kv_heads,
                               self.model.head_dim)
        caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                  for _ in range(self.model.num_layers)]
        metadata = self.build_metadata(query_lens, query_lens, tables, self.block_size,
                                       self.device)
        positions = torch.cat([torch.arange(q) for q in query_lens]).to(self.device)
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, positions, caches, metadata)
        logits = self.model.compute_logits(hidden)
        torch.log_softmax(logits.float(), dim=-1)
        sampled_part = logits[:self._sample_rows()].float()  # [rows, vocab]
        torch.softmax(sampled_part, dim=-1).cumsum(-1, dtype=torch.float64)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return sum(c.numel() * c.element_size() for c in caches)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput,
                structured: StructuredOutputManager | None = None) -> StepResult:
        """Forward and sample; `structured` is given only while a structured request lives."""
        # With adapters, the step runs its requests grouped by slot (each adapter's tokens one
        # contiguous run) and the results are put back in the scheduler's order at the end.
        lora_slots = self._lora_slots_of(out.scheduled)
        order = None if lora_slots is None else sorted(range(len(lora_slots)),
                                                       key=lora_slots.__getitem__)
        scheduled = out.scheduled if order is None else [out.scheduled[i] for i in order]
        query_lens = [s.num_new_tokens for s in scheduled]
        seq_lens = [s.request.num_computed_tokens + s.num_new_tokens for s in scheduled]
        token_chunks = [
            s.request.all_token_ids[s.request.num_computed_tokens:seq_len] + s.spec_token_ids
            for s, seq_len in zip(scheduled, seq_lens, strict=True)
        ]
        input_ids = torch.from_numpy(np.fromiter(
            (t for chunk in token_chunks for t in chunk), dtype=np.int64, count=sum(query_lens)))
        positions = torch.from_numpy(np.concatenate([
            np.arange(seq_len - q, seq_len, dtype=np.int64)
            for q, seq_len in zip(query_lens, seq_lens, strict=True)
        ]))
        # a decode with proposals runs one single-token query per position (spec_decode.verify)
        rows = attention_rows(query_lens, seq_lens, [s.block_ids for s in scheduled],
                              [len(s.spec_token_ids) for s in scheduled])
        ends = np.cumsum(query_lens) - 1
        # one sampled row per position that predicts a token: a verifying request has k+1
        sample_at = [(i, j) for i, s in enumerate(scheduled) if s.completes_sequence
                     for j in range(len(s.spec_token_ids) + 1)]
        part_rows = self._sample_rows()
        parts = [sample_at[first:first + part_rows]
                 for first in range(0, len(sample_at), part_rows)]
        indices = [[int(ends[i]) - len(scheduled[i].spec_token_ids) + j for i, j in part]
                   for part in parts]
        prompt_spans = _prompt_logprob_spans(scheduled, ends)
        if self.parallel is not None:  # the other ranks run the same forward and logit rows
            self.parallel.send_step(WorkerStep(
                input_ids.tolist(), *rows, indices
                + [list(range(first, first + n)) for first, n in prompt_spans.values() if n]))
        hidden = None  # [num_tokens, hidden]
        if self.cuda_graphs is not None and lora_slots is None:  # decode-only steps replay
            hidden = self.cuda_graphs.run(*rows, input_ids)
        if hidden is None:
            hidden = self._forward(out, scheduled, query_lens, rows, input_ids, positions,
                                   lora_slots, order)
        tokens: list[int] = []
        row_logprobs: list[LogprobsLists | None] = []
        for part, index in zip(parts, indices, strict=True):
            part_tokens, part_logprobs = self._sample(
                [scheduled[i].request for i, _ in part],
                [scheduled[i].spec_token_ids[:j] for i, j in part],
                hidden[torch.as_tensor(index, device=self.device)], structured)
            tokens += part_tokens
            row_logprobs += part_logprobs or [None] * len(part)
        result = verified_result(scheduled, sample_at, tokens, row_logprobs)
        result.prompt_logprobs = self._prompt_logprobs(scheduled, hidden, prompt_spans)
        if order is None:
            return result
        return StepResult(_in_order(result.sampled, order) or [],
                          _in_order(result.logprobs, order),
                          _in_order(result.prompt_logprobs, order),
                          _in_order(result.spec_tokens, order))

    def _sample_rows(self) -> int:
        return CUDA_SAMPLE_ROWS if self.device.type == "cuda" else SAMPLE_ROWS

    def _forward(self, out: SchedulerOutput, scheduled: list[ScheduledRequest],
                 query_lens: list[int], rows: tuple[list[int], list[int], list[list[int]]],
                 input_ids: torch.Tensor, positions: torch.Tensor,
                 lora_slots: list[int] | None, order: list[int] | None) -> torch.Tensor:
        """The step's forward pass, op by op: hidden states [num_tokens, hidden]; `rows` are
        the attention's query lengths, sequence lengths and block tables."""
        metadata = self.build_metadata(*rows, self.block_size, self.device)
        if lora_slots is not None and order is not None:
            from kvflow.lora.slots import build_mapping

            metadata.lora = build_mapping([lora_slots[i] for i in order], query_lens,
                                          self.device)
        input_ids = input_ids.to(self.device)
        embeds = None
        if self.encoder_runner is not None:
            self.encoder_runner.free(out.freed_encoder_ids)
            embeds = self.encoder_runner.input_embeddings(self.model, scheduled, input_ids)
        return self.model(input_ids, positions.to(self.device), self.kv_caches, metadata,
                          embeds)  # [num_tokens, hidden]

    def _sample(self, requests: list[Request], proposed: list[list[int]], hidden: torch.Tensor,
                structured: StructuredOutputManager | None
                ) -> tuple[list[int], list[LogprobsLists | None] | None]:
        """Next token (and logprobs where asked) of each row from its hidden state; a row
        after proposals sees them in its history (`proposed`: per row, maybe empty)."""
        logits = self.model.compute_logits(hidden)  # [len(requests), vocab]
        grammar_rows: list[int] = []
        if structured is not None:
            # before the sampler, as in vLLM: logprobs are then those of the masked logits
            # (requests with a grammar make no proposals: one row each)
            grammar_rows = structured.mask_logits(logits, requests)
        metadata = SamplingMetadata.build(
            [r.sampling_params for r in requests],
            [r.prompt_token_ids for r in requests],
            [r.output_token_ids + extra if extra else r.output_token_ids
             for r, extra in zip(requests, proposed, strict=True)],
            [r.generator for r in requests],
            self.vocab_size, self.device,
        )
        result = self.sampler(logits, metadata)
        tokens = result.sampled_token_ids.tolist()
        if grammar_rows:
            assert structured is not None
            structured.accept_tokens(requests, grammar_rows, tokens)
        if result.logprobs is None:
            return tokens, None
        per_row = _split_logprobs(result.logprobs)
        return tokens, [None if r.sampling_params.logprobs is None
                        else _trim(lists, r.sampling_params.logprobs)
                        for r, lists in zip(requests, per_row, strict=True)]

    def _prompt_logprobs(self, scheduled: list, hidden: torch.Tensor,
                         spans: dict[int, tuple[int, int]]) -> list[LogprobsLists | None] | None:
        """Logprobs of each prompt token given the tokens before it, for requests asking."""
        if not spans:
            return None
        result: list[LogprobsLists | None] = [None] * len(scheduled)
        for i, (first, count) in spans.items():
            request = scheduled[i].request
            if not count:
                result[i] = LogprobsLists([], [], [])
                continue
            # positions start..start+n-1 predict tokens start+1..start+n (prompt only)
            start = request.num_computed_tokens
            logits = self.model.compute_logits(hidden[first:first + count])
            targets = torch.tensor(request.all_token_ids[start + 1:start + count + 1],
                                   device=self.device)
            result[i] = _to_lists(compute_prompt_logprobs(
                logits, targets, request.sampling_params.prompt_logprobs))
        return result


def _prompt_logprob_spans(scheduled: list[ScheduledRequest],
                          ends: np.ndarray) -> dict[int, tuple[int, int]]:
    """Requests whose prompt logprobs this step computes: index -> (first hidden row, rows);
    0 rows when the step holds none of its prompt's predicted tokens."""
    spans: dict[int, tuple[int, int]] = {}
    for i, s in enumerate(scheduled):
        request = s.request
        if request.sampling_params.prompt_logprobs is None or request.num_output_tokens > 0:
            continue
        start = request.num_computed_tokens
        stop = min(start + s.num_new_tokens, request.num_prompt_tokens - 1)
        spans[i] = (int(ends[i]) - s.num_new_tokens + 1, max(0, stop - start))
    return spans


def _in_order(values: list | None, order: list[int]) -> list | None:
    """values[k] belongs to request order[k]: put it back at that index."""
    if values is None:
        return None
    result = [None] * len(values)
    for k, index in enumerate(order):
        result[index] = values[k]
    return result


def _to_lists(t: LogprobsTensors) -> LogprobsLists:
    return LogprobsLists(t.token_ids.tolist(), t.logprobs.tolist(), t.ranks.tolist())


def _split_logprobs(t: LogprobsTensors) -> list[LogprobsLists]:
    ids, lps, ranks = t.token_ids.tolist(), t.logprobs.tolist(), t.ranks.tolist()
    return [LogprobsLists([ids[j]], [lps[j]], [ranks[j]]) for j in range(len(ids))]


def _trim(lists: LogprobsLists, k: int) -> LogprobsLists:
    """Keep the sampled token plus this request's own top-k (the batch computed the max)."""
    return LogprobsLists([row[:k + 1] for row in lists.token_ids],
                         [row[:k + 1] for row in lists.logprobs], lists.ranks)
