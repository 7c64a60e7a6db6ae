"""LLMEngine: a synchronous engine with the core in this process (used by `LLM`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from kvflow.config import EngineArgs, EngineConfig
from kvflow.engine.core import EngineCore
from kvflow.engine.output_processor import OutputProcessor
from kvflow.engine.processor import PromptType, build_processor, load_tokenizer
from kvflow.engine.streams import ParentRequest
from kvflow.lora.request import LoRARequest
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams
from kvflow.tracing import make_tracer, warn_tracing_disabled


class LLMEngine:
    """Processor → EngineCore → OutputProcessor, driven by explicit step() calls."""

    def __init__(self, config: EngineConfig) -> None:
        if config.data_parallel_config is not None:
            raise ValueError("data_parallel_size > 1 needs AsyncLLM (or kvflow serve): LLM "
                             "runs one engine core in this process")
        self.config = config
        self.tokenizer = load_tokenizer(config.model_config)
        self.tracer = make_tracer(config.observability_config, config.model_config.model)
        self.core = EngineCore(config)
        self.processor = build_processor(config, self.tokenizer, self.core.num_blocks)
        self.output_processor = OutputProcessor(
            self.tokenizer, config.scheduler_config.stream_interval, self.tracer)
        self.parents: dict[str, ParentRequest] = {}

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args.create_engine_config())

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    priority: int = 0, tokenization_kwargs: dict[str, Any] | None = None,
                    lora_request: LoRARequest | None = None,
                    trace_headers: Mapping[str, str] | None = None) -> None:
        """Validate and queue one request (n > 1 fans out to n child requests)."""
        if request_id in self.parents or request_id in self.output_processor.states:
            raise ValueError(f"request id {request_id!r} is already running")
        if self.core.sleeping:
            raise ValueError("the engine is asleep: call wake_up() first")
        if lora_request is not None:
            if not isinstance(lora_request, LoRARequest):
                raise ValueError(
                    f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
            self.core.get_lora(lora_request)  # a bad adapter fails here, before anything queues
        text, ids, images = self.processor.process(prompt, tokenization_kwargs)
        arrival = time.time()
        if trace_headers and self.tracer is None:
            warn_tracing_disabled()
        if params.n == 1:
            req = self.processor.make_request(request_id, ids, params, arrival, priority,
                                              lora_request, images)
            self.output_processor.add_request(request_id, text, ids, params, arrival,
                                              lora_request=lora_request,
                                              trace_headers=trace_headers)
            self.core.add_request(req)
            return
        parent = ParentRequest(request_id, params)
        children = [
            self.processor.make_request(child_id, ids, parent.child_params(i), arrival, priority,
                                        lora_request, images)
            for i, child_id in enumerate(parent.child_ids)
        ]
        self.parents[request_id] = parent
        for i, req in enumerate(children):
            self.output_processor.add_request(req.request_id, text, ids, req.sampling_params,
                                              arrival, parent=parent, index=i,
                                              lora_request=lora_request,
                                              trace_headers=trace_headers)
            self.core.add_request(req)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        return self.core.add_lora(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self.core.remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        return self.core.list_loras()

    def pin_lora(self, lora_id: int) -> bool:
        return self.core.pin_lora(lora_id)

    def step(self) -> list[RequestOutput]:
        core_outputs = self.core.step()
        processed = self.output_processor.process_outputs(core_outputs.outputs,
                                                          core_outputs.timestamp)
        if processed.reqs_to_abort:
            self.core.abort_requests(processed.reqs_to_abort)
        for out in processed.request_outputs:
            if out.finished:
                self.parents.pop(out.request_id, None)
        return processed.request_outputs

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        child_ids = []
        for request_id in ids:
            parent = self.parents.pop(request_id, None)
            child_ids.extend(parent.child_ids if parent else [request_id])
        self.core.abort_requests(child_ids)
        return self.output_processor.abort_requests(child_ids, time.time())

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests() or self.core.has_work()

    def get_tokenizer(self) -> Any:
        return self.tokenizer
