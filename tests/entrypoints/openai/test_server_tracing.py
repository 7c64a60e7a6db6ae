"""`kvflow serve --otlp-traces-endpoint`: an HTTP request's traceparent parents its span."""

from __future__ import annotations

from pathlib import Path

import httpx

from kvflow.tracing import SpanAttributes
from tests.entrypoints.conftest import TINY_ARGS, RemoteServer
from tests.entrypoints.hostile import wait_for_no_leftovers
from tests.otlp_receiver import HttpReceiver, attributes

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


def test_traceparent_header_parents_the_request_span(tiny_llama_path: Path) -> None:
    env = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
           "OTEL_BSP_SCHEDULE_DELAY": "100"}  # ms: export soon after the request ends
    with HttpReceiver() as receiver, RemoteServer(
            [str(tiny_llama_path), *TINY_ARGS, "--otlp-traces-endpoint", receiver.endpoint,
             "--collect-detailed-traces", "worker"], env=env) as server:
        model = httpx.get(server.url("/v1/models"), timeout=10).json()["data"][0]["id"]
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "k=v"}
        for path, body in (("/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "Hi"}]}),
                           ("/v1/completions", {"prompt": "Once upon a time"})):
            reply = httpx.post(server.url(path), headers=headers, timeout=60, json={
                "model": model, "max_tokens": 3, "temperature": 0, **body})
            assert reply.status_code == 200, reply.text
        spans = receiver.store.wait_for("llm_request", 2)
        for span in spans:
            assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_ID
            assert span.trace_state == "k=v"
            attrs = attributes(span.attributes)
            assert attrs[SpanAttributes.GEN_AI_USAGE_COMPLETION_TOKENS] == 3
            assert attrs[SpanAttributes.GEN_AI_LATENCY_TIME_IN_MODEL_EXECUTE] > 0
            assert set(receiver.store.children_of(span)) == {"queue", "prefill", "decode"}
        ids = {attributes(s.attributes)[SpanAttributes.GEN_AI_REQUEST_ID] for s in spans}
        assert any(i.startswith("chatcmpl") for i in ids) and any(i.startswith("cmpl") for i in ids)
        assert "tracing: requests exported as spans to" in server.log()
        assert not wait_for_no_leftovers(server)
