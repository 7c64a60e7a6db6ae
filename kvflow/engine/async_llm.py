"""AsyncLLM: vLLM's asyncio engine interface over an engine core in its own process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Iterable, Mapping
from typing import Any

import msgspec

from kvflow.config import AsyncEngineArgs, EngineConfig
from kvflow.engine.core_client import CoreClient, RequestsFailed, make_core_client
from kvflow.engine.output_processor import OutputProcessor
from kvflow.engine.processor import PromptType, build_processor, load_tokenizer
from kvflow.engine.protocol import EngineCoreRequest, MultiModalFeature, SchedulerStats
from kvflow.engine.stats import StatsLogger
from kvflow.engine.streams import ParentRequest, RequestOutputCollector
from kvflow.errors import EngineDeadError, EngineGenerateError
from kvflow.lora.request import LoRARequest
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams
from kvflow.tracing import make_tracer, warn_tracing_disabled

logger = logging.getLogger(__name__)

PAUSE_MODES = ("abort", "wait", "keep")


class AsyncLLM:
    """Streams RequestOutputs for many concurrent requests sharing one engine core."""

    def __init__(self, config: EngineConfig, *, multiprocess: bool = True,
                 log_stats: bool | None = None) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.model_config)
        # before the core starts: a bad tracing setting must not leave a core process behind
        self.tracer = make_tracer(config.observability_config, config.model_config.model)
        self.engine_core: CoreClient = make_core_client(config, multiprocess)
        self.processor = build_processor(config, self.tokenizer, self.engine_core.num_kv_blocks)
        self.output_processor = OutputProcessor(self.tokenizer,
                                                config.scheduler_config.stream_interval,
                                                self.tracer)
        self.parents: dict[str, ParentRequest] = {}
        self.held: list[EngineCoreRequest] = []  # requests that arrived while paused
        self._paused = False
        self._sleeping = False  # sleep() paused the client: wake_up() resumes it
        self._idle = asyncio.Event()  # set whenever no request is in flight
        self._output_task: asyncio.Task[None] | None = None
        self._shutdown = False
        self.stats_logger = StatsLogger(config.log_stats if log_stats is None else log_stats)
        # adapters the core accepted: id -> (name, path); a request naming one of these is
        # queued without asking the core again
        self._loras: dict[int, tuple[str, str]] = {}

    @classmethod
    def from_engine_args(cls, args: AsyncEngineArgs) -> AsyncLLM:
        return cls(args.create_engine_config(), multiprocess=args.multiprocess,
                   log_stats=not args.disable_log_stats)

    @classmethod
    def from_vllm_config(cls, config: EngineConfig, **kwargs: Any) -> AsyncLLM:
        return cls(config, **kwargs)

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- requests ----------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: PromptType,
                          params: SamplingParams, arrival_time: float | None = None,
                          lora_request: Any = None,
                          tokenization_kwargs: dict[str, Any] | None = None,
                          trace_headers: Mapping[str, str] | None = None,
                          priority: int = 0) -> RequestOutputCollector:
        """Validate, tokenize and queue a request; returns the collector of its outputs."""
        self._check_alive()
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if request_id in self.parents or request_id in self.output_processor.states:
            raise ValueError(f"request id {request_id!r} is already running")
        if lora_request is not None:
            await self._check_lora(lora_request)
        text, ids, images = await self._tokenize(prompt, tokenization_kwargs)
        arrival = arrival_time if arrival_time is not None else time.time()
        if trace_headers and self.tracer is None:
            warn_tracing_disabled()
        self._ensure_output_handler()
        base = await self._make_request(request_id, ids, params, arrival, priority, lora_request,
                                        images)
        if request_id in self.parents or request_id in self.output_processor.states:
            raise ValueError(f"request id {request_id!r} is already running")  # raced
        collector = RequestOutputCollector(params.output_kind)
        parent = ParentRequest(request_id, base.sampling_params) if params.n > 1 else None
        requests = [base] if parent is None else [
            msgspec.structs.replace(base, request_id=cid, sampling_params=parent.child_params(i))
            for i, cid in enumerate(parent.child_ids)
        ]
        try:  # from the first registration on, a failure must undo everything
            if parent is not None:
                self.parents[request_id] = parent
            for i, req in enumerate(requests):
                self.output_processor.add_request(req.request_id, text, ids, req.sampling_params,
                                                  arrival, parent=parent, index=i,
                                                  sink=collector.put, lora_request=lora_request,
                                                  trace_headers=trace_headers)
            self._idle.clear()
            for req in requests:
                if self._paused:
                    self.held.append(req)
                else:  # an n > 1 family runs on one replica: its children share the prompt
                    self.engine_core.add_request(req, request_id if parent else None)
        except BaseException:
            self._abort_quietly(request_id)
            raise
        return collector

    async def _make_request(self, request_id: str, ids: list[int], params: SamplingParams,
                            arrival: float, priority: int, lora_request: LoRARequest | None,
                            images: list[MultiModalFeature] | None) -> EngineCoreRequest:
        """Validate once (children share the result); heavy checks run off the event loop."""
        heavy = (params.structured_outputs is not None or bool(params.bad_words)
                 or len(params.allowed_token_ids or ()) > 256 or len(ids) > 4096)
        if heavy:  # grammar compilation, tokenizing bad words, scanning long lists
            return await asyncio.to_thread(self.processor.make_request, request_id, ids, params,
                                           arrival, priority, lora_request, images)
        return self.processor.make_request(request_id, ids, params, arrival, priority,
                                           lora_request, images)

    async def _tokenize(self, prompt: PromptType, kwargs: dict[str, Any] | None
                        ) -> tuple[str | None, list[int], list[MultiModalFeature] | None]:
        if (isinstance(prompt, str) and len(prompt) > 512) or self.processor.has_images(prompt):
            # long texts tokenize, and images decode and preprocess, in a worker thread so
            # the event loop keeps streaming
            return await asyncio.to_thread(self.processor.process, prompt, kwargs)
        return self.processor.process(prompt, kwargs)

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams,
                       request_id: str, *, lora_request: Any = None,
                       tokenization_kwargs: dict[str, Any] | None = None,
                       trace_headers: Mapping[str, str] | None = None,
                       priority: int = 0) -> AsyncGenerator[RequestOutput, None]:
        """Stream the request's outputs; closing or cancelling the stream aborts it."""
        collector = await self.add_request(
            request_id, prompt, sampling_params, lora_request=lora_request,
            tokenization_kwargs=tokenization_kwargs, trace_headers=trace_headers,
            priority=priority)
        async with contextlib.aclosing(self.stream_outputs(request_id, collector)) as outputs:
            async for out in outputs:
                yield out

    async def stream_outputs(self, request_id: str, collector: RequestOutputCollector
                             ) -> AsyncGenerator[RequestOutput, None]:
        """The second half of generate(), for a request already queued with add_request().

        A server queues a request at once (so it counts against capacity before its response
        starts) and streams it later. Closing the stream early aborts the request; a request
        whose stream never starts still finishes in the engine and leaves no state.
        """
        finished = False
        try:
            while not finished:
                out = collector.get_nowait() or await collector.get()
                finished = out.finished
                yield out
        except (EngineDeadError, EngineGenerateError, ValueError):
            raise
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise EngineGenerateError(f"request {request_id} failed: {exc!r}") from exc
        finally:
            if not finished:
                self._abort_quietly(request_id)

    def _child_ids(self, request_ids: Iterable[str]) -> list[str]:
        ids: list[str] = []
        for request_id in request_ids:
            parent = self.parents.get(request_id)
            ids.extend(parent.child_ids if parent is not None else [request_id])
        return ids

    def _abort_quietly(self, request_id: str) -> None:
        """The consumer went away: drop the request everywhere, emit nothing."""
        ids = self._child_ids([request_id])
        self.parents.pop(request_id, None)
        for child_id in ids:
            self.output_processor.states.pop(child_id, None)
        self.held = [r for r in self.held if r.request_id not in ids]
        self.engine_core.abort_requests(ids)
        self._update_idle()

    async def abort(self, request_id: str | Iterable[str]) -> None:
        """Abort requests: each stream ends with a final output whose finish_reason is abort."""
        request_ids = [request_id] if isinstance(request_id, str) else list(request_id)
        ids = self._child_ids(request_ids)
        self.held = [r for r in self.held if r.request_id not in ids]
        self.engine_core.abort_requests(ids)
        self.output_processor.abort_requests(ids, time.time())
        for rid in request_ids:
            self.parents.pop(rid, None)
        self._update_idle()

    # ---- LoRA adapters -----------------------------------------------------------------
    async def _check_lora(self, lora_request: Any) -> None:
        """Refuse a bad adapter before its request is queued: the first request naming an
        adapter has the core load it (as add_lora does); later ones find it known."""
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(
                f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        known = self._loras.get(lora_request.lora_int_id)
        if known != (lora_request.lora_name, lora_request.lora_path):
            await self.add_lora(lora_request)

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load an adapter into the engine (ValueError naming it and the reason if refused)."""
        self._check_alive()
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(
                f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        if self.config.lora_config is None:
            raise ValueError("LoRA is not enabled: start the engine with enable_lora=True")
        added = bool(await self.engine_core.call_utility("add_lora", lora_request))
        self._loras[lora_request.lora_int_id] = (lora_request.lora_name, lora_request.lora_path)
        return added

    async def remove_lora(self, lora_id: int) -> bool:
        """Unload an adapter and free its slot; False if it was not loaded."""
        self._check_alive()
        self._loras.pop(lora_id, None)
        return bool(await self.engine_core.call_utility("remove_lora", lora_id))

    async def list_loras(self) -> set[int]:
        """Ids of the adapters loaded in the engine."""
        self._check_alive()
        return set(await self.engine_core.call_utility("list_loras"))

    async def pin_lora(self, lora_id: int) -> bool:
        """Keep an adapter loaded: LRU eviction passes it over."""
        self._check_alive()
        return bool(await self.engine_core.call_utility("pin_lora", lora_id))

    # ---- output handling ----------------------------------------------------------------
    def _ensure_output_handler(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._output_task
        if task is None or task.done() or task.get_loop() is not loop:
            # (a new event loop, e.g. a second asyncio.run(), needs its own handler)
            self._output_task = loop.create_task(self._output_handler())

    async def _output_handler(self) -> None:
        try:
            while True:
                try:
                    outputs = await self.engine_core.get_output()
                except RequestsFailed as failed:  # one replica of several died
                    self._fail_requests(failed.request_ids, failed.error)
                    continue
                chunk = 16  # yield to the loop between chunks: consumers get their tokens sooner
                for start in range(0, len(outputs.outputs), chunk):
                    processed = self.output_processor.process_outputs(
                        outputs.outputs[start:start + chunk], outputs.timestamp)
                    self.engine_core.abort_requests(processed.reqs_to_abort)
                    if start + chunk < len(outputs.outputs):
                        await asyncio.sleep(0)
                self._forget_finished_parents()
                self._update_idle()
                self.stats_logger.record(outputs, self.engine_core.engine_stats())
        except EngineDeadError as exc:
            self._fail_all(exc)
        except Exception as exc:  # a bug here must not leave streams hanging
            logger.exception("output handler failed")
            self._fail_all(EngineDeadError(f"the output handler failed: {exc!r}"))

    def _forget_finished_parents(self) -> None:
        states = self.output_processor.states
        done = [rid for rid, p in self.parents.items() if not any(c in states for c in p.child_ids)]
        for rid in done:
            del self.parents[rid]

    def _fail_all(self, exc: EngineDeadError) -> None:
        for state in list(self.output_processor.states.values()):
            if state.sink is not None:
                state.sink(exc)
        self.output_processor.states.clear()
        self.parents.clear()
        self._idle.set()

    def _fail_requests(self, request_ids: list[str], exc: EngineDeadError) -> None:
        """End these requests' streams with `exc` (their replica died); others go on."""
        states = self.output_processor.states
        for request_id in request_ids:
            state = states.pop(request_id, None)
            if state is not None and state.sink is not None:
                state.sink(exc)
        self._forget_finished_parents()
        self._update_idle()

    def _update_idle(self) -> None:
        in_flight = len(self.output_processor.states) - len(self.held)
        if in_flight <= 0:
            self._idle.set()

    # ---- pause / resume ---------------------------------------------------------------
    async def pause_generation(self, mode: str = "abort", clear_cache: bool = True) -> None:
        """Stop generating: abort in-flight requests, wait for them, or keep them frozen."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode must be one of {PAUSE_MODES}, got {mode!r}")
        self._check_alive()
        if self._paused:
            return
        self._paused = True
        if mode == "abort":
            await self.abort(list(self.parents) + [
                rid for rid, s in self.output_processor.states.items() if s.parent is None])
        elif mode == "wait":
            self._update_idle()
            await self._idle.wait()
        else:
            await self.engine_core.call_utility("pause")
        if clear_cache and mode != "keep":
            await self.engine_core.call_utility("reset_prefix_cache")

    async def resume_generation(self) -> None:
        self._check_alive()
        if not self._paused:
            return
        self._paused = False
        await self.engine_core.call_utility("resume")
        held, self.held = self.held, []
        for req in held:
            state = self.output_processor.states.get(req.request_id)
            parent = state.parent if state is not None else None
            self.engine_core.add_request(req, parent.request_id if parent else None)

    async def is_paused(self) -> bool:
        return self._paused

    # ---- sleep mode -------------------------------------------------------------------------
    async def sleep(self, level: int = 1) -> None:
        """Free the KV cache (level 1: the prefix cache too) and at level 2 the weights.

        In-flight requests finish first; requests that arrive while asleep wait, held in
        this client, and run after wake_up(). Needs enable_sleep_mode=True."""
        self._check_alive()
        if not self.config.enable_sleep_mode:
            raise ValueError("sleep mode is off: start the engine with enable_sleep_mode=True")
        if isinstance(level, bool) or level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
        we_paused = not self._paused  # a pause the caller made outlives the sleep
        await self.pause_generation(mode="wait", clear_cache=False)
        try:
            await self.engine_core.call_utility("sleep", level)
        except BaseException:
            if we_paused:
                await self.resume_generation()
            raise
        self._sleeping = self._sleeping or we_paused

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore the weights and the KV cache (or only the given tags: "weights",
        "kv_cache"); once both are back, held requests run."""
        self._check_alive()
        await self.engine_core.call_utility("wake_up", tags)
        if self._sleeping and not await self.is_sleeping():
            self._sleeping = False
            await self.resume_generation()

    async def is_sleeping(self) -> bool:
        self._check_alive()
        return bool(await self.engine_core.call_utility("is_sleeping"))

    # ---- health and introspection ---------------------------------------------------------
    def _check_alive(self) -> None:
        if self._shutdown:
            raise EngineDeadError("the engine has been shut down")
        self.engine_core.check_alive()

    async def check_health(self) -> None:
        """Raise EngineDeadError if the engine, or any one of its replicas, died."""
        if self._shutdown:
            raise EngineDeadError("the engine has been shut down")
        self.engine_core.check_health()

    @property
    def errored(self) -> bool:
        return self.engine_core.dead_error is not None

    @property
    def dead_error(self) -> BaseException:
        return self.engine_core.dead_error or EngineDeadError()

    @property
    def is_running(self) -> bool:
        return not self._shutdown and not self.errored

    @property
    def is_stopped(self) -> bool:
        return self._shutdown

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def is_unfinished(self, request_id: str) -> bool:
        """Whether this client still tracks the request (or its n > 1 children)."""
        return request_id in self.parents or request_id in self.output_processor.states

    def get_num_unfinished_requests(self) -> int:
        """Requests (children of n > 1 counted one by one) this client still tracks."""
        return len(self.output_processor.states)

    async def get_scheduler_stats(self) -> SchedulerStats:
        stats = await self.engine_core.call_utility("get_stats")
        return msgspec.convert(stats, SchedulerStats)  # a dict when it crossed ZMQ

    async def get_engine_stats(self) -> list[SchedulerStats | None]:
        """Each engine core's stats (one per data-parallel replica; None: a dead one)."""
        results = await self.engine_core.call_each("get_stats")
        return [None if r is None else msgspec.convert(r, SchedulerStats) for r in results]

    async def reset_prefix_cache(self) -> bool:
        return bool(await self.engine_core.call_utility("reset_prefix_cache"))

    async def get_num_unfinished_requests_in_core(self) -> int:
        return int(await self.engine_core.call_utility("num_unfinished_requests"))

    def shutdown(self) -> None:
        """Stop the engine core and its sockets; safe to call more than once."""
        if self._shutdown:
            return
        self._shutdown = True
        if self._output_task is not None and not self._output_task.done():
            with contextlib.suppress(RuntimeError):  # its loop may be closed already
                self._output_task.cancel()
        self.engine_core.shutdown()
        if self.tracer is not None:
            self.tracer.shutdown()  # sends the spans still batched


AsyncLLMEngine = AsyncLLM
