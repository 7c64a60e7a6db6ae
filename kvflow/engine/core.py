"""EngineCore: the scheduler, KV cache and model runner, advanced one step at a time."""

from __future__ import annotations

import atexit
import logging
import math
import time
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec
import torch

from kvflow.config import EngineConfig
from kvflow.core.kv_cache import KVCacheManager
from kvflow.core.request import Request, RequestStatus
from kvflow.core.scheduler import Scheduler, SchedulerOutput, StepResult
from kvflow.engine.protocol import (
    EngineCoreOutputs,
    EngineCoreRequest,
    KVCacheEvents,
    RequestTimings,
    SchedulerStats,
)
from kvflow.lora.request import LoRARequest

if TYPE_CHECKING:
    from kvflow.kv_offload.manager import OffloadManager
    from kvflow.lora.adapter import LoRAAdapter
    from kvflow.lora.manager import LoRACache
    from kvflow.spec_decode.proposer import Proposer
    from kvflow.structured.manager import StructuredOutputManager

logger = logging.getLogger(__name__)


class EngineCore:
    """schedule → execute → update; the same object runs in-process or in its own process."""

    def __init__(self, config: EngineConfig) -> None:
        from kvflow.distributed.executor import make_executor  # heavy: loads torch models

        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.model_config.seed)
        # the model runner, and the tensor-parallel workers when there are any
        self.executor = make_executor(config)
        self.runner = self.executor.runner
        cc = config.cache_config
        self.kv = KVCacheManager(self.runner.num_blocks, cc.block_size, cc.enable_prefix_caching)
        dp = config.data_parallel_config
        if dp is not None and dp.kv_cache_events and cc.enable_prefix_caching:
            self.kv.event_state = {}  # a replica: the client's router mirrors its cache
        mc = config.model_config
        self.scheduler = Scheduler(config.scheduler_config, self.kv, mc.max_model_len)
        self.paused = False
        self.sleeping: set[str] = set()  # what sleep() freed: "weights", "kv_cache"
        self._seq = 0
        self.structured: StructuredOutputManager | None = None  # made at the first grammar
        self.loras: LoRACache | None = self._lora_cache()
        self.offload: OffloadManager | None = self._offload()
        self.proposer: Proposer | None = self._proposer()
        self._shut_down = False
        # detailed traces: time each model step and charge it to the requests in it
        self._time_steps = config.observability_config.collect_model_execute_time
        if self.offload is not None and self.offload.disk is not None:
            atexit.register(_shutdown_at_exit, weakref.ref(self))
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens); up to %.2f sequences of %d tokens",
            self.num_blocks, cc.block_size, self.num_blocks * cc.block_size,
            self.max_concurrency, mc.max_model_len,
        )

    def _lora_cache(self) -> LoRACache | None:
        lc = self.config.lora_config
        if lc is None:
            return None
        from kvflow.lora.adapter import LoRAShapes
        from kvflow.lora.manager import LoRACache

        hf_config = self.config.model_config.hf_config or {}
        shapes = LoRAShapes.from_hf_config(hf_config.get("text_config") or hf_config)
        return LoRACache(shapes, lc.max_lora_rank, lc.max_cpu_loras, lc.dtype)

    def _offload(self) -> OffloadManager | None:
        """The second KV tier, hooked into the prefix cache's evictions."""
        cc = self.config.cache_config
        if not cc.kv_offloading_bytes:
            return None
        from kvflow.kv_offload.manager import OffloadConfig, OffloadManager, model_key

        mc = self.config.model_config
        key = model_key(mc.path, mc.dtype, (self.runner.num_layers, *self.runner.kv_shape[2:]),
                        mc.quantization)
        offload = OffloadManager(
            OffloadConfig(cc.kv_offloading_bytes, cc.kv_offloading_path,
                          cc.kv_offloading_disk_bytes),
            lambda: self.runner.kv_caches, key)
        self.kv.on_evict = offload.store
        self.scheduler.offload = offload
        logger.info("second KV tier: %.2f GiB of host memory%s", cc.kv_offloading_bytes / 2**30,
                    f", disk level in {offload.disk.folder}" if offload.disk else "")
        return offload

    def _proposer(self) -> Proposer | None:
        """Speculative decoding: proposals made after each step, verified in the next."""
        sc = self.config.speculative_config
        if sc is None:
            return None
        from kvflow.spec_decode.proposer import Proposer

        draft = None
        if sc.method == "draft_model":
            from kvflow.spec_decode.draft import DraftModel

            draft = DraftModel(sc, self.config, self.runner)
            draft.kv = self.kv
        logger.info("speculative decoding: %s, %d tokens per step", sc.method,
                    sc.num_speculative_tokens)
        return Proposer(sc, draft)

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def max_concurrency(self) -> float:
        """How many full-length (max_model_len) sequences fit in the KV cache at once."""
        blocks_per_seq = self.kv.blocks_needed(self.config.model_config.max_model_len)
        return self.num_blocks / blocks_per_seq

    def add_request(self, req: EngineCoreRequest) -> None:
        if req.request_id in self.scheduler.requests:
            raise ValueError(f"request id {req.request_id!r} is already running")
        if req.mm_features:
            self._check_images(req)
        self._seq += 1
        request = Request(req, self.config.model_config.max_model_len, self._seq,
                          self.runner.device)
        if req.lora_request is not None:
            request.lora = self.get_lora(req.lora_request)
        if self.config.observability_config.tracing_enabled:
            request.queued_time = time.time()
        structured = req.sampling_params.structured_outputs
        if structured is not None:
            request.grammar = self._structured_manager().add_request(req.request_id, structured)
        self.scheduler.add_request(request)

    def _check_images(self, req: EngineCoreRequest) -> None:
        """A request's images must match the model and its own placeholders (the client
        checked; this keeps a malformed message from reaching the model)."""
        mc = self.config.model_config
        if mc.image_token_id is None:
            raise ValueError(f"{mc.model} takes no images (a text-only model)")
        ids, end = req.prompt_token_ids, 0
        for feature in req.mm_features or ():
            span = ids[feature.offset:feature.offset + feature.length]
            itemsize = getattr(torch, feature.dtype, torch.uint8).itemsize
            if (feature.offset < end or feature.length != mc.tokens_per_image
                    or len(span) != feature.length
                    or any(t != mc.image_token_id for t in span)
                    or len(feature.pixels) != itemsize * math.prod(feature.shape)):
                raise ValueError(f"image {feature.identifier[:12]} does not match its "
                                 f"{feature.length} placeholders at {feature.offset}")
            end = feature.offset + feature.length

    def _structured_manager(self) -> StructuredOutputManager:
        if self.structured is None:
            from kvflow.structured.manager import StructuredOutputManager  # imports llguidance

            mc = self.config.model_config
            self.structured = StructuredOutputManager(
                mc.tokenizer_path, mc.vocab_size, mc.eos_token_ids,
                self.config.scheduler_config.max_num_seqs, self.runner.device,
                self.config.structured_outputs_config)
        return self.structured

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        ended = self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        if self.structured is not None:
            self.structured.finish_requests(r.request_id for r in ended)
        return ended

    def has_work(self) -> bool:
        return not self.paused and not self.sleeping and self.scheduler.has_schedulable_requests()

    def check_health(self) -> None:
        """Raise if part of the engine died (a tensor-parallel worker)."""
        self.executor.check_health()

    def step(self) -> EngineCoreOutputs:
        self.executor.check_health()
        if not self.has_work():
            return EngineCoreOutputs([], time.time())
        scheduler_output = self.scheduler.schedule()
        if not scheduler_output.scheduled:
            if self.offload is not None and self.scheduler.loading:
                self.offload.wait_any(timeout=0.05)  # only loads in flight: wait, not spin
            return EngineCoreOutputs([], time.time())
        structured = self.structured if self.structured and self.structured.live else None
        start = time.perf_counter()
        result = self._execute(scheduler_output, structured)
        spent = time.perf_counter() - start
        if self._time_steps:  # detailed traces: each request adds up the model steps it was in
            for s in scheduler_output.scheduled:
                s.request.model_execute_time += spent
        outputs = self.scheduler.update_from_output(scheduler_output, result)
        if self.proposer is not None:
            self.proposer.observe(scheduler_output, result, spent)
            self.proposer.propose(self.scheduler.running)
        finished = [o for o in outputs if o.finish_reason is not None]
        if self._time_steps:
            requests = {s.request.request_id: s.request for s in scheduler_output.scheduled}
            for out in finished:
                out.timings = out.timings or RequestTimings()
                out.timings.model_execute_time = requests[out.request_id].model_execute_time
        if structured is not None:
            structured.finish_requests(o.request_id for o in finished)
        return EngineCoreOutputs(outputs, time.time(), kv_events=self.kv.take_events())

    def take_kv_events(self) -> KVCacheEvents | None:
        """Prefix-cache changes not reported yet (a utility call such as a reset made them)."""
        return self.kv.take_events()

    def _execute(self, scheduler_output: SchedulerOutput,
                 structured: StructuredOutputManager | None) -> StepResult:
        try:
            return self.runner.execute(scheduler_output, structured)
        except RuntimeError:  # a failed collective: name the dead worker if there is one
            self.executor.check_health(wait_s=0.5)
            raise

    # ---- utility calls (also reachable over ZMQ by name) ------------------------------
    def pause(self) -> None:
        """Stop scheduling; running requests keep their KV blocks until resume."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    # ---- sleep mode (utility calls) -------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Free the KV cache (level 1; the prefix cache's index goes with it, so no stale
        hash can point at discarded KV) and at level 2 the weights too. Only with no request
        in the core: AsyncLLM drains (and holds new requests) first."""
        if not self.config.enable_sleep_mode:
            raise ValueError("sleep mode is off: start the engine with enable_sleep_mode=True")
        if isinstance(level, bool) or level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
        if self.scheduler.requests:
            raise ValueError(f"cannot sleep with {len(self.scheduler.requests)} requests in "
                             "the engine: let them finish or abort them first")
        if self.sleeping and level == 1:
            return
        self.spill_prefix_cache()
        assert self.kv.reset_prefix_cache()  # every block is free: no request holds one
        self.reset_mm_cache()
        self.runner.sleep(level)
        self.sleeping = {"kv_cache", "weights"} if level == 2 else self.sleeping | {"kv_cache"}
        logger.info("sleeping at level %d: %s freed", level, " and ".join(sorted(self.sleeping)))

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore what sleep freed: both, or only the tags given ("weights", "kv_cache")."""
        wanted = {"weights", "kv_cache"} if tags is None else set(tags)
        unknown = wanted - {"weights", "kv_cache"}
        if unknown:
            raise ValueError(f"wake_up tags must be 'weights' or 'kv_cache', got {sorted(unknown)}")
        self.runner.wake_up(wanted & self.sleeping)
        self.sleeping -= wanted
        logger.info("awake%s", f" except {', '.join(sorted(self.sleeping))}" if self.sleeping
                    else "")

    def spill_prefix_cache(self, budget_s: float = float("inf"), write_now: bool = False) -> int:
        """Copy the prefix cache's blocks the second tier lacks into it (and to disk), within
        `budget_s` seconds; returns the blocks stored. Sleep and shutdown do this, so the
        blocks every request shares (never evicted) reach the disk level too."""
        if self.offload is None:
            return 0
        deadline = time.monotonic() + budget_s
        stored = 0
        for block_hash, block_id in list(self.kv.cached.items()):
            if time.monotonic() > deadline:
                break
            if not self.offload.contains(block_hash):
                self.offload.store(block_id, block_hash, write_now)
                stored += 1
        self.offload.flush()
        return stored

    def shutdown(self) -> None:
        """Before the engine stops: the prefix cache goes to the disk level (a restart finds
        it), within a few seconds. Runs once: at the engine loop's end, or at interpreter
        exit for an engine in this process (LLM)."""
        if self._shut_down:
            return
        self._shut_down = True
        if self.offload is not None and self.offload.disk is not None:
            self.offload.flush()  # queued writes first, then the rest in this thread
            stored = self.spill_prefix_cache(budget_s=3.0, write_now=True)
            logger.info("second KV tier: %d cached blocks written before shutdown", stored)
        if self.offload is not None:
            self.offload.close()
        self.executor.shutdown()

    def is_sleeping(self) -> bool:
        return bool(self.sleeping)

    def get_stats(self) -> SchedulerStats:
        stats = self.scheduler.stats()
        if self.runner.encoder_runner is not None:
            stats.mm_images_encoded = self.runner.encoder_runner.num_images_encoded
        if self.offload is not None:
            o = self.offload.stats
            stats.kv_offload_hit_blocks = o.hit_blocks
            stats.kv_offload_blocks_stored, stats.kv_offload_blocks_loaded = (
                o.blocks_stored, o.blocks_loaded)
            stats.kv_offload_bytes_stored, stats.kv_offload_bytes_loaded = (
                o.bytes_stored, o.bytes_loaded)
            stats.kv_offload_load_seconds = o.load_seconds
        return stats

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()

    def reset_mm_cache(self) -> bool:
        """Drop every image embedding no request needs; False while one is referenced."""
        cache = self.scheduler.encoder_cache
        if cache is None:
            return True
        done = cache.reset()
        if self.runner.encoder_runner is not None:
            self.runner.encoder_runner.free(cache.take_freed())
        return done

    def num_unfinished_requests(self) -> int:
        return len(self.scheduler.requests)

    # ---- LoRA adapters (utility calls too) ---------------------------------------------------
    def get_lora(self, lora_request: Any, reload: bool = False) -> LoRAAdapter:
        """The loaded adapter of a LoRARequest, read from disk if needed (ValueError if
        refused or LoRA is off)."""
        if self.loras is None:
            raise ValueError("LoRA is not enabled: start the engine with enable_lora=True")
        if not isinstance(lora_request, LoRARequest):  # a list when it crossed ZMQ
            lora_request = msgspec.convert(lora_request, LoRARequest)
        return self.loras.get(lora_request, reload)

    def add_lora(self, lora_request: Any) -> bool:
        """Load an adapter ahead of its requests (ValueError naming it if it is refused);
        load_inplace=True reads it again even when its id is loaded."""
        if not isinstance(lora_request, LoRARequest):
            lora_request = msgspec.convert(lora_request, LoRARequest)
        adapter = self.get_lora(lora_request, reload=lora_request.load_inplace)
        logger.info("LoRA adapter '%s' (id %d, rank %d, %.1f MB) loaded", adapter.name,
                    adapter.int_id, adapter.rank, adapter.nbytes / 1e6)
        return True

    def remove_lora(self, lora_id: int) -> bool:
        """Forget an adapter and free its slot; running requests finish with their copy."""
        if self.loras is None or self.loras.remove(lora_id) is None:
            return False
        self.runner.release_lora(lora_id)
        return True

    def list_loras(self) -> set[int]:
        return set() if self.loras is None else self.loras.ids()

    def pin_lora(self, lora_id: int) -> bool:
        if self.loras is None:
            raise ValueError("LoRA is not enabled: start the engine with enable_lora=True")
        return self.loras.pin(lora_id)


def _shutdown_at_exit(core: weakref.ref[EngineCore]) -> None:
    alive = core()
    if alive is not None:
        alive.shutdown()
