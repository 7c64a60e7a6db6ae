"""Client side of a request's way out: core outputs → detokenized, stop-checked RequestOutputs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvflow.engine.detokenizer import IncrementalDetokenizer
from kvflow.engine.protocol import EngineCoreOutput, FinishReason, LogprobsLists, RequestTimings
from kvflow.engine.streams import ParentRequest
from kvflow.outputs import (
    CompletionOutput,
    Logprob,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
    SampleLogprobs,
)
from kvflow.sampling_params import RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from kvflow.tracing import RequestTracer


class TokenTexts:
    """Decoded text of single tokens, for logprobs (memoised: the vocabulary is finite)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._cache[token_id] = text
        return text


@dataclass
class RequestState:
    """Everything the client knows about one (child) request while it runs."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    parent: ParentRequest | None
    index: int
    sink: Callable[[RequestOutput | BaseException], None] | None
    metrics: RequestMetrics
    stream_interval: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0
    lora_request: Any = None
    trace_headers: Mapping[str, str] | None = None  # the parent span's context (tracing on)
    sent_tokens: int = 0  # tokens already emitted (DELTA) / count at the last emission
    sent_logprobs: int = 0
    sent_prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        if self.params.logprobs is not None:
            self.logprobs = []
            self.cumulative_logprob = 0.0


@dataclass
class ProcessedOutputs:
    """Outputs to hand to callers, and requests the core must drop (stopped by a string)."""

    request_outputs: list[RequestOutput] = field(default_factory=list)
    reqs_to_abort: list[str] = field(default_factory=list)


class OutputProcessor:
    """Keeps per-request state on the client; turns EngineCoreOutputs into RequestOutputs."""

    def __init__(self, tokenizer: Any, stream_interval: int = 1,
                 tracer: RequestTracer | None = None) -> None:
        self.tracer = tracer  # None unless tracing is on: then each finished request is a span
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval
        self.token_text = TokenTexts(tokenizer)
        self.states: dict[str, RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float,
                    parent: ParentRequest | None = None, index: int = 0,
                    sink: Callable[[RequestOutput | BaseException], None] | None = None,
                    lora_request: Any = None,
                    trace_headers: Mapping[str, str] | None = None) -> None:
        if request_id in self.states:
            raise ValueError(f"request id {request_id!r} is already running")
        self.states[request_id] = RequestState(
            request_id=request_id, prompt=prompt, prompt_token_ids=prompt_token_ids,
            params=params,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params),
            parent=parent, index=index, sink=sink, metrics=RequestMetrics(arrival_time),
            stream_interval=self.stream_interval, lora_request=lora_request,
            trace_headers=trace_headers,
        )

    def has_unfinished_requests(self) -> bool:
        return bool(self.states)

    def process_outputs(self, outputs: Iterable[EngineCoreOutput],
                        timestamp: float) -> ProcessedOutputs:
        result = ProcessedOutputs()
        for out in outputs:
            state = self.states.get(out.request_id)
            if state is None:
                continue  # aborted on this side already
            try:
                self._process_one(state, out, timestamp, result)
            except Exception as exc:  # one request's failure must not disturb the others
                self._fail(state, exc, result)
        return result

    def _process_one(self, state: RequestState, out: EngineCoreOutput, timestamp: float,
                     result: ProcessedOutputs) -> None:
        metrics = state.metrics
        if out.new_token_ids:
            if metrics.first_token_time is None:
                metrics.first_token_time = timestamp
            metrics.last_token_time = timestamp
        state.num_cached_tokens = out.num_cached_tokens
        if out.timings is not None:  # tracing is on
            _record_timings(metrics, out.timings)
        finish_reason, stop_reason = out.finish_reason, out.stop_reason
        stop_terminated = finish_reason == FinishReason.STOP
        stop_str = state.detokenizer.update(out.new_token_ids, stop_terminated)
        # a step of several tokens whose stop string ended before its last one: keep those
        kept = len(out.new_token_ids) - state.detokenizer.num_dropped
        state.token_ids.extend(out.new_token_ids[:kept])
        if out.new_prompt_logprobs is not None:
            self._add_prompt_logprobs(state, out.new_prompt_logprobs)
        if out.new_logprobs is not None and state.logprobs is not None:
            self._add_logprobs(state, out.new_logprobs, kept)
        if stop_str is not None and finish_reason is None:
            finish_reason, stop_reason = FinishReason.STOP, stop_str
            result.reqs_to_abort.append(state.request_id)
        elif stop_str is not None:
            finish_reason, stop_reason = FinishReason.STOP, stop_str
        if out.error is not None:
            raise RuntimeError(out.error)
        self._emit(state, finish_reason, stop_reason, timestamp, result)

    def _emit(self, state: RequestState, finish_reason: FinishReason | None,
              stop_reason: int | str | None, timestamp: float, result: ProcessedOutputs) -> None:
        finished = finish_reason is not None
        kind = state.params.output_kind
        if not finished:
            if kind == RequestOutputKind.FINAL_ONLY:
                return
            pending = len(state.token_ids) - state.sent_tokens
            if state.sent_tokens > 0 and pending < state.stream_interval:
                return
        else:
            state.metrics.finished_time = timestamp
            del self.states[state.request_id]
            if self.tracer is not None:
                self.tracer.request_finished(
                    state.request_id, state.params, len(state.prompt_token_ids),
                    len(state.token_ids), state.metrics, state.trace_headers,
                    str(finish_reason), state.num_cached_tokens)
        completion = self._completion(state, finish_reason, stop_reason, finished)
        output = self._request_output(state, completion, finished)
        if output is None:
            return
        if state.sink is not None:
            state.sink(output)
        else:
            result.request_outputs.append(output)

    def _completion(self, state: RequestState, finish_reason: FinishReason | None,
                    stop_reason: int | str | None, finished: bool) -> CompletionOutput:
        delta = state.params.output_kind == RequestOutputKind.DELTA
        text = state.detokenizer.get_next_output_text(finished, delta)
        if delta:
            token_ids = state.token_ids[state.sent_tokens:]
            logprobs = state.logprobs[state.sent_logprobs:] if state.logprobs is not None else None
        else:
            token_ids = list(state.token_ids)
            logprobs = list(state.logprobs) if state.logprobs is not None else None
        state.sent_tokens = len(state.token_ids)
        state.sent_logprobs = len(state.logprobs) if state.logprobs is not None else 0
        return CompletionOutput(
            index=state.index, text=text, token_ids=token_ids,
            cumulative_logprob=state.cumulative_logprob, logprobs=logprobs,
            finish_reason=str(finish_reason) if finish_reason is not None else None,
            stop_reason=stop_reason,
        )

    def _request_output(self, state: RequestState, completion: CompletionOutput,
                        finished: bool) -> RequestOutput | None:
        prompt_logprobs = state.prompt_logprobs
        if state.params.output_kind == RequestOutputKind.DELTA and prompt_logprobs is not None:
            prompt_logprobs = None if state.sent_prompt_logprobs else prompt_logprobs
            state.sent_prompt_logprobs = True
        parent = state.parent
        request_id = parent.request_id if parent is not None else state.request_id
        outputs = [completion]
        if parent is not None:
            merged = parent.add_child_output(completion, finished)
            if merged is None:
                return None  # FINAL_ONLY waits for every child
            outputs, finished = merged
        return RequestOutput(
            request_id=request_id, prompt=state.prompt, prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=prompt_logprobs, outputs=outputs, finished=finished,
            metrics=state.metrics, num_cached_tokens=state.num_cached_tokens,
            lora_request=state.lora_request,
        )

    def _to_dict(self, ids: list[int], lps: list[float], rank: int) -> dict[int, Logprob]:
        entry = {ids[0]: Logprob(lps[0], rank, self.token_text(ids[0]))}
        for r, (tid, lp) in enumerate(zip(ids[1:], lps[1:], strict=True), start=1):
            if tid not in entry:
                entry[tid] = Logprob(lp, r, self.token_text(tid))
        return entry

    def _add_logprobs(self, state: RequestState, lists: LogprobsLists, kept: int) -> None:
        assert state.logprobs is not None and state.cumulative_logprob is not None
        rows = zip(lists.token_ids[:kept], lists.logprobs[:kept], lists.ranks[:kept],
                   strict=True)
        for ids, lps, rank in rows:
            state.logprobs.append(self._to_dict(ids, lps, rank))
            state.cumulative_logprob += lps[0]

    def _add_prompt_logprobs(self, state: RequestState, lists: LogprobsLists) -> None:
        if state.prompt_logprobs is None:
            state.prompt_logprobs = [None]  # the first prompt token has no context
        for ids, lps, rank in zip(lists.token_ids, lists.logprobs, lists.ranks, strict=True):
            state.prompt_logprobs.append(self._to_dict(ids, lps, rank))

    def _fail(self, state: RequestState, exc: Exception, result: ProcessedOutputs) -> None:
        """End a failed request, and its n > 1 siblings: nobody will read what they make."""
        from kvflow.errors import EngineGenerateError

        ids = [state.request_id] if state.parent is None else state.parent.child_ids
        for request_id in ids:
            if self.states.pop(request_id, None) is not None or request_id == state.request_id:
                result.reqs_to_abort.append(request_id)
        error = EngineGenerateError(f"request {state.request_id} failed: {exc!r}")
        if state.sink is not None:
            state.sink(error)
        else:
            raise error

    def abort_requests(self, request_ids: Iterable[str], timestamp: float) -> list[RequestOutput]:
        """End requests on the client side with finish_reason "abort"."""
        result = ProcessedOutputs()
        for request_id in request_ids:
            state = self.states.get(request_id)
            if state is not None:
                self._emit(state, FinishReason.ABORT, None, timestamp, result)
        return result.request_outputs


def _record_timings(metrics: RequestMetrics, timings: RequestTimings) -> None:
    """The core's timestamps of a traced request, as vLLM's RequestMetrics fields."""
    if timings.scheduled_time:
        metrics.first_scheduled_time = timings.scheduled_time
        metrics.time_in_queue = timings.scheduled_time - timings.queued_time
    if timings.model_execute_time:
        metrics.model_execute_time = timings.model_execute_time
