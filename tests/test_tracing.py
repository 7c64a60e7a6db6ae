"""OpenTelemetry tracing: a span tree per request reaches an in-test OTLP collector.

The collectors (tests/otlp_receiver.py) decode what the SDK's real OTLP exporters send, over
http/protobuf and over gRPC; the span's parent comes from a W3C traceparent.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvflow import SamplingParams
from kvflow.config import AsyncEngineArgs, EngineArgs
from kvflow.engine.async_llm import AsyncLLM
from kvflow.engine.llm_engine import LLMEngine
from kvflow.tracing import ObservabilityConfig, SpanAttributes
from tests.engine.leaks import assert_core_clean
from tests.engine.test_async_llm import assert_engine_clean
from tests.otlp_receiver import GrpcReceiver, HttpReceiver, SpanStore, attributes

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
A = SpanAttributes


def tiny_args(path: Path, **kw: object) -> dict[str, object]:
    return {"model": str(path), "kv_cache_memory_gb": 0.05, "num_threads": 1, **kw}


def check_span_tree(store: SpanStore, span: object, prompt_len: int, out_len: int,
                    params: SamplingParams, request_id: str) -> dict[str, object]:
    """The llm_request span's attributes and its queue → prefill → decode children."""
    attrs = attributes(span.attributes)  # type: ignore[attr-defined]
    assert attrs[A.GEN_AI_REQUEST_ID] == request_id
    assert attrs[A.GEN_AI_REQUEST_MAX_TOKENS] == params.max_tokens
    assert attrs[A.GEN_AI_REQUEST_TEMPERATURE] == pytest.approx(params.temperature)
    assert attrs[A.GEN_AI_REQUEST_TOP_P] == pytest.approx(params.top_p)
    assert attrs[A.GEN_AI_REQUEST_N] == params.n
    assert attrs[A.GEN_AI_USAGE_PROMPT_TOKENS] == prompt_len
    assert attrs[A.GEN_AI_USAGE_COMPLETION_TOKENS] == out_len
    for name in (A.GEN_AI_LATENCY_TIME_IN_QUEUE, A.GEN_AI_LATENCY_TIME_IN_MODEL_PREFILL,
                 A.GEN_AI_LATENCY_TIME_IN_MODEL_DECODE):
        assert attrs[name] >= 0
    assert 0 < attrs[A.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN] <= attrs[A.GEN_AI_LATENCY_E2E]
    assert span.kind == 2  # type: ignore[attr-defined]  # SPAN_KIND_SERVER
    children = store.children_of(span)  # type: ignore[arg-type]
    assert set(children) == {"queue", "prefill", "decode"}
    queue, prefill, decode = children["queue"], children["prefill"], children["decode"]
    # one after the other, inside the request's span
    times = [span.start_time_unix_nano, queue.start_time_unix_nano,  # type: ignore[attr-defined]
             queue.end_time_unix_nano, prefill.end_time_unix_nano, decode.end_time_unix_nano,
             span.end_time_unix_nano]  # type: ignore[attr-defined]
    assert times == sorted(times), times
    assert queue.end_time_unix_nano == prefill.start_time_unix_nano
    assert prefill.end_time_unix_nano == decode.start_time_unix_nano
    span_queue = (queue.end_time_unix_nano - queue.start_time_unix_nano) / 1e9
    assert span_queue == pytest.approx(attrs[A.GEN_AI_LATENCY_TIME_IN_QUEUE], abs=1e-6)
    return attrs


def test_config_is_validated() -> None:
    config = ObservabilityConfig.parse("http://x:4317", "model, worker")
    assert config.collect_detailed_traces == ("model", "worker")
    assert ObservabilityConfig.parse("http://x:4317", ["all"]).collect_model_execute_time
    assert not ObservabilityConfig.parse(None, None).tracing_enabled
    with pytest.raises(ValueError, match="needs otlp_traces_endpoint"):
        ObservabilityConfig.parse(None, "all")
    with pytest.raises(ValueError, match="collect_detailed_traces"):
        ObservabilityConfig.parse("http://x:4317", "gpu")
    with pytest.raises(ValueError, match="otlp_traces_endpoint"):
        ObservabilityConfig.parse(" ", None)


def test_http_protobuf_span_tree_with_detailed_traces(
        tiny_llama_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "kvflow-test")
    with HttpReceiver() as receiver:
        engine = LLMEngine.from_engine_args(EngineArgs(**tiny_args(  # type: ignore[arg-type]
            tiny_llama_path, otlp_traces_endpoint=receiver.endpoint,
            collect_detailed_traces="all")))
        params = SamplingParams(max_tokens=5, temperature=0.8, top_p=0.9, seed=1,
                                ignore_eos=True)
        engine.add_request("traced", "Once upon a time", params,
                           trace_headers={"traceparent": TRACEPARENT})
        engine.add_request("root", "Hello there", params)  # no context: a trace of its own
        outputs = {}
        while engine.has_unfinished_requests():
            outputs.update({o.request_id: o for o in engine.step() if o.finished})
        assert engine.tracer is not None
        engine.tracer.shutdown()  # flush
        spans = {attributes(s.attributes)[A.GEN_AI_REQUEST_ID]: s
                 for s in receiver.store.wait_for("llm_request", 2)}
    traced = spans["traced"]
    assert traced.trace_id.hex() == TRACE_ID and traced.parent_span_id.hex() == PARENT_ID
    assert spans["root"].trace_id.hex() != TRACE_ID and not spans["root"].parent_span_id
    for request_id, span in spans.items():
        out = outputs[request_id]
        attrs = check_span_tree(receiver.store, span, len(out.prompt_token_ids),
                                len(out.outputs[0].token_ids), params, request_id)
        assert attrs[A.GEN_AI_LATENCY_TIME_IN_MODEL_EXECUTE] > 0  # detailed traces
        assert attrs[A.GEN_AI_LATENCY_TIME_IN_MODEL_EXECUTE] <= attrs[A.GEN_AI_LATENCY_E2E]
    assert receiver.store.resources[0]["service.name"] == "kvflow-test"
    assert_core_clean(engine.core)


async def test_grpc_span_tree_across_the_engine_core_process(
        tiny_llama_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AsyncLLM.generate(trace_headers=...) with the core in its own process, OTLP over gRPC
    (the default protocol): the core's queue/scheduled timestamps cross the process boundary."""
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "true")
    with GrpcReceiver() as receiver:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**tiny_args(  # type: ignore[arg-type]
            tiny_llama_path, otlp_traces_endpoint=receiver.endpoint)))
        try:
            params = SamplingParams(max_tokens=4, temperature=0.0)
            final = None
            async for out in engine.generate("Once upon a time", params, "g1",
                                             trace_headers={"traceparent": TRACEPARENT}):
                final = out
            assert final is not None and final.finished
            assert engine.tracer is not None
            engine.tracer.provider.force_flush()
            span = receiver.store.wait_for("llm_request", 1)[0]
            assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_ID
            attrs = check_span_tree(receiver.store, span, len(final.prompt_token_ids),
                                    len(final.outputs[0].token_ids), params, "g1")
            assert A.GEN_AI_LATENCY_TIME_IN_MODEL_EXECUTE not in attrs  # not asked for
            await assert_engine_clean(engine)
        finally:
            engine.shutdown()


NO_TRACING = """
import sys
from kvflow.config import EngineArgs
from kvflow.engine.llm_engine import LLMEngine
from kvflow.sampling_params import SamplingParams
import kvflow.tracing as tracing

made = []
tracing.RequestTracer.__init__ = lambda *a, **k: made.append(1)  # must never run
engine = LLMEngine.from_engine_args(EngineArgs(model=sys.argv[1], kv_cache_memory_gb=0.05,
                                               num_threads=1))
engine.add_request("r", "Hello", SamplingParams(max_tokens=3),
                   trace_headers={"traceparent": sys.argv[2]})
while engine.has_unfinished_requests():
    engine.step()
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
assert engine.tracer is None and engine.output_processor.tracer is None and not made
assert not loaded, loaded
print("no tracer, nothing imported")
"""


def test_without_an_endpoint_no_exporter_and_no_import(tiny_llama_path: Path) -> None:
    """A fresh interpreter: a request with trace context but no endpoint creates no tracer or
    exporter and imports nothing from opentelemetry; it only warns once."""
    done = subprocess.run([sys.executable, "-c", NO_TRACING, str(tiny_llama_path), TRACEPARENT],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "no tracer, nothing imported" in done.stdout
    assert done.stderr.count("trace context but tracing is disabled") == 1


def test_bad_protocol_is_a_value_error(tiny_llama_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "carrier-pigeon")
    with pytest.raises(ValueError, match="carrier-pigeon"):
        AsyncLLM.from_engine_args(AsyncEngineArgs(**tiny_args(  # type: ignore[arg-type]
            tiny_llama_path, otlp_traces_endpoint="http://127.0.0.1:9")))
