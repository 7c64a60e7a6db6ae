"""OpenTelemetry tracing of requests (vLLM's `--otlp-traces-endpoint`), optional and lazy.

With an endpoint, each finished request becomes one `llm_request` span (vLLM's name, kind
SERVER, vLLM's `gen_ai.*` attributes) whose parent is the W3C `traceparent` / `tracestate`
the request came with, and which has three child spans with their real start and end times:
`queue` (the engine core received it → first scheduled), `prefill` (first scheduled → first
token) and `decode` (first → last token). Spans go out through the OpenTelemetry SDK's OTLP
exporter (`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`: grpc, the default, or http/protobuf; the
other standard `OTEL_*` variables apply as the SDK reads them).

Without an endpoint nothing here imports opentelemetry and no exporter exists: the engine
keeps `tracer = None` and the only cost is that one None check when a request finishes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvflow.outputs import RequestMetrics
    from kvflow.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

TRACE_HEADERS = ("traceparent", "tracestate")
DETAILED_TRACE_MODULES = ("model", "worker", "all")
SPAN_NAME = "llm_request"
TRACER_NAME = "kvflow.llm_engine"


class SpanAttributes:
    """Attribute names, as vLLM's (the OpenTelemetry gen-ai conventions, plus its own)."""

    GEN_AI_REQUEST_ID = "gen_ai.request.id"
    GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
    GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
    GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
    GEN_AI_REQUEST_N = "gen_ai.request.n"
    GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
    GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
    GEN_AI_USAGE_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"
    GEN_AI_USAGE_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
    GEN_AI_USAGE_CACHED_TOKENS = "gen_ai.usage.cached_tokens"
    GEN_AI_LATENCY_TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
    GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"
    GEN_AI_LATENCY_E2E = "gen_ai.latency.e2e"
    GEN_AI_LATENCY_TIME_IN_MODEL_PREFILL = "gen_ai.latency.time_in_model_prefill"
    GEN_AI_LATENCY_TIME_IN_MODEL_DECODE = "gen_ai.latency.time_in_model_decode"
    GEN_AI_LATENCY_TIME_IN_MODEL_INFERENCE = "gen_ai.latency.time_in_model_inference"
    GEN_AI_LATENCY_TIME_IN_MODEL_EXECUTE = "gen_ai.latency.time_in_model_execute"


@dataclass(frozen=True)
class ObservabilityConfig:
    """Tracing settings (vLLM's otlp_traces_endpoint and collect_detailed_traces)."""

    otlp_traces_endpoint: str | None = None
    collect_detailed_traces: tuple[str, ...] = ()

    @classmethod
    def parse(cls, endpoint: str | None,
              detailed: str | list[str] | tuple[str, ...] | None) -> ObservabilityConfig:
        """Validate; `detailed` is a list or vLLM's comma-separated string ("model,worker")."""
        if endpoint is not None and (not isinstance(endpoint, str) or not endpoint.strip()):
            raise ValueError(f"otlp_traces_endpoint must be a URL, got {endpoint!r}")
        items = detailed.split(",") if isinstance(detailed, str) else list(detailed or ())
        modules = tuple(m.strip() for m in items if isinstance(m, str) and m.strip())
        bad = [m for m in items if not isinstance(m, str) or
               (m.strip() and m.strip() not in DETAILED_TRACE_MODULES)]
        if bad:
            raise ValueError(f"collect_detailed_traces must be among "
                             f"{', '.join(DETAILED_TRACE_MODULES)}, got {bad}")
        if modules and endpoint is None:
            raise ValueError("collect_detailed_traces needs otlp_traces_endpoint")
        if endpoint is not None:
            _check_otel_installed()
        return cls(endpoint, modules)

    @property
    def tracing_enabled(self) -> bool:
        return self.otlp_traces_endpoint is not None

    @property
    def collect_model_execute_time(self) -> bool:
        """kvflow times a whole model step (forward and sampling), so any module asks it."""
        return bool(self.collect_detailed_traces)


def _check_otel_installed() -> None:
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"otlp_traces_endpoint needs the OpenTelemetry packages: "
                         f"pip install 'kvflow[tracing]' ({exc})") from None


def extract_trace_headers(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The W3C trace-context headers of an HTTP request (None when it has none)."""
    found = {name: headers[name] for name in TRACE_HEADERS if name in headers}
    return found or None


_warned_disabled = False


def warn_tracing_disabled() -> None:
    """Once per process: a request carried trace context, but no endpoint is set."""
    global _warned_disabled
    if not _warned_disabled:
        _warned_disabled = True
        logger.warning("Received a request with trace context but tracing is disabled "
                       "(set --otlp-traces-endpoint)")


def make_tracer(config: ObservabilityConfig, model_name: str) -> RequestTracer | None:
    """The engine's tracer, or None (nothing imported, no exporter) without an endpoint."""
    if config.otlp_traces_endpoint is None:
        return None
    return RequestTracer(config.otlp_traces_endpoint, model_name)


def _span_exporter(endpoint: str) -> Any:
    """The SDK's OTLP exporter for the protocol the standard variables choose."""
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL must be grpc or http/protobuf, "
                         f"got {protocol!r}")
    return OTLPSpanExporter(endpoint=endpoint), protocol


class RequestTracer:
    """Turns each finished request into an `llm_request` span with queue/prefill/decode
    children, batched to an OTLP collector by the SDK's BatchSpanProcessor."""

    def __init__(self, endpoint: str, model_name: str) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        exporter, protocol = _span_exporter(endpoint)
        service = os.environ.get("OTEL_SERVICE_NAME") or "kvflow"
        # A provider of our own, not the global one: an application embedding kvflow keeps
        # its own, and two engines in one process do not fight over it.
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer(TRACER_NAME)
        self.propagator = TraceContextTextMapPropagator()
        self.model_name = model_name
        self.num_spans = 0
        logger.info("tracing: requests exported as spans to %s over %s (service %s)",
                    endpoint, protocol, service)

    def request_finished(self, request_id: str, params: SamplingParams, num_prompt_tokens: int,
                         num_output_tokens: int, metrics: RequestMetrics,
                         trace_headers: Mapping[str, str] | None, finish_reason: str,
                         num_cached_tokens: int = 0) -> None:
        """Emit the request's span tree; times are the engine's (time.time(), seconds).
        A tracing failure is logged, never raised: it must not fail the request."""
        try:
            self._emit(request_id, params, num_prompt_tokens, num_output_tokens, metrics,
                       trace_headers, finish_reason, num_cached_tokens)
        except Exception:
            logger.exception("tracing: could not record the span of request %s", request_id)

    def _emit(self, request_id: str, params: SamplingParams, num_prompt_tokens: int,
              num_output_tokens: int, metrics: RequestMetrics,
              trace_headers: Mapping[str, str] | None, finish_reason: str,
              num_cached_tokens: int) -> None:
        from opentelemetry.trace import SpanKind, set_span_in_context

        parent = self.propagator.extract(dict(trace_headers or {}))
        end = metrics.finished_time or metrics.last_token_time or metrics.arrival_time
        span = self.tracer.start_span(SPAN_NAME, context=parent, kind=SpanKind.SERVER,
                                      start_time=_ns(metrics.arrival_time))
        span.set_attributes(_attributes(request_id, params, num_prompt_tokens,
                                        num_output_tokens, metrics, end, self.model_name))
        span.set_attribute(SpanAttributes.GEN_AI_RESPONSE_FINISH_REASONS, [finish_reason])
        span.set_attribute(SpanAttributes.GEN_AI_USAGE_CACHED_TOKENS, num_cached_tokens)
        inside = set_span_in_context(span)
        for name, start, stop in _phases(metrics):
            child = self.tracer.start_span(name, context=inside, start_time=_ns(start))
            child.end(end_time=_ns(stop))
        span.end(end_time=_ns(end))
        self.num_spans += 1

    def shutdown(self) -> None:
        """Send what is still batched, then stop the exporter."""
        self.provider.shutdown()


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _phases(m: RequestMetrics) -> list[tuple[str, float, float]]:
    """The child spans a request went through: (name, start, end), in order."""
    phases = []
    scheduled = m.first_scheduled_time
    if scheduled is not None and m.time_in_queue is not None:
        phases.append(("queue", scheduled - m.time_in_queue, scheduled))
        if m.first_token_time is not None:
            phases.append(("prefill", scheduled, m.first_token_time))
    if m.first_token_time is not None and m.last_token_time is not None:
        phases.append(("decode", m.first_token_time, m.last_token_time))
    return phases


def _attributes(request_id: str, params: SamplingParams, num_prompt_tokens: int,
                num_output_tokens: int, m: RequestMetrics, end: float,
                model_name: str) -> dict[str, Any]:
    a = SpanAttributes
    attrs: dict[str, Any] = {
        a.GEN_AI_REQUEST_ID: request_id, a.GEN_AI_RESPONSE_MODEL: model_name,
        a.GEN_AI_REQUEST_TEMPERATURE: params.temperature, a.GEN_AI_REQUEST_TOP_P: params.top_p,
        a.GEN_AI_REQUEST_N: params.n,
        a.GEN_AI_USAGE_PROMPT_TOKENS: num_prompt_tokens,
        a.GEN_AI_USAGE_COMPLETION_TOKENS: num_output_tokens,
        a.GEN_AI_LATENCY_E2E: end - m.arrival_time,
    }
    if params.max_tokens is not None:
        attrs[a.GEN_AI_REQUEST_MAX_TOKENS] = params.max_tokens
    if m.time_in_queue is not None:
        attrs[a.GEN_AI_LATENCY_TIME_IN_QUEUE] = m.time_in_queue
    if m.first_token_time is not None:
        attrs[a.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN] = m.first_token_time - m.arrival_time
        if m.first_scheduled_time is not None:
            attrs[a.GEN_AI_LATENCY_TIME_IN_MODEL_PREFILL] = \
                m.first_token_time - m.first_scheduled_time
    if m.first_token_time is not None and m.last_token_time is not None:
        attrs[a.GEN_AI_LATENCY_TIME_IN_MODEL_DECODE] = m.last_token_time - m.first_token_time
        if m.first_scheduled_time is not None:
            attrs[a.GEN_AI_LATENCY_TIME_IN_MODEL_INFERENCE] = \
                m.last_token_time - m.first_scheduled_time
    if m.model_execute_time is not None:
        attrs[a.GEN_AI_LATENCY_TIME_IN_MODEL_EXECUTE] = m.model_execute_time
    return attrs
