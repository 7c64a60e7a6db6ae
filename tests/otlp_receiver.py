"""In-test OpenTelemetry collectors: OTLP over HTTP (protobuf) and over gRPC.

Each decodes the ExportTraceServiceRequest messages it receives with the opentelemetry-proto
classes and keeps the spans, so a test can check what an exporter really sent.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2


class SpanStore:
    """Spans received so far (thread-safe), with their resource attributes."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []
        self.resources: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._lock:
            for resource_spans in request.resource_spans:
                self.resources.append(attributes(resource_spans.resource.attributes))
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)

    def wait_for(self, name: str, count: int, timeout: float = 30.0) -> list[trace_pb2.Span]:
        """The first `count` spans named `name`, waiting for them to arrive."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = [s for s in self.spans if s.name == name]
            if len(found) >= count or time.monotonic() > deadline:
                assert len(found) >= count, f"{len(found)} {name!r} spans of {count} arrived"
                return found

    def children_of(self, span: trace_pb2.Span) -> dict[str, trace_pb2.Span]:
        with self._lock:
            return {s.name: s for s in self.spans
                    if s.parent_span_id == span.span_id and s.trace_id == span.trace_id}


def attributes(kvs: Any) -> dict[str, Any]:
    """OTLP KeyValues as a plain dict (scalars, and arrays of scalars as lists)."""
    out: dict[str, Any] = {}
    for kv in kvs:
        out[kv.key] = _value(kv.value)
    return out


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


class HttpReceiver:
    """OTLP/HTTP (http/protobuf) on 127.0.0.1: POST /v1/traces; a context manager."""

    def __init__(self) -> None:
        self.store = SpanStore()
        store = self.store

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                ok = self.path == "/v1/traces"
                if ok:
                    store.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HttpReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class GrpcReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """OTLP/gRPC on 127.0.0.1 (insecure); a context manager."""

    def __init__(self) -> None:
        import grpc

        self.store = SpanStore()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{port}"

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (grpc's name)
        self.store.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def __enter__(self) -> GrpcReceiver:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(grace=None)
