"""Helpers for the image-input server tests: test images as bytes and URLs, a local HTTP
server that serves them (one route slow, others missing), and /metrics counters."""

from __future__ import annotations

import base64
import contextlib
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
from PIL import Image


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """An RGB noise image: equal arguments give equal pixels."""
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), np.uint8)
    return Image.fromarray(pixels, "RGB")


def encode(image: Image.Image, fmt: str) -> bytes:
    """The image as PNG or JPEG file bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def decoded(data: bytes) -> Image.Image:
    """What the server sees: the file bytes decoded to RGB (JPEG is lossy)."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


class _Handler(BaseHTTPRequestHandler):
    server: ImageHost

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        delay_s, body = route
        time.sleep(delay_s)
        # a slow route's client gave up long ago: its socket is closed
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class ImageHost(ThreadingHTTPServer):
    """http.server on a free loopback port, in a thread: path -> (delay in s, body); any
    other path is a 404. A context manager."""

    daemon_threads = True  # a handler still sleeping does not hold up the shutdown

    def __init__(self, routes: dict[str, tuple[float, bytes]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes = routes
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def __enter__(self) -> ImageHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(10)


def counters(metrics_url: str) -> dict[str, float]:
    """Every Prometheus counter of /metrics by name (its `_total` sample, summed over labels)."""
    totals: dict[str, float] = {}
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if not line.startswith("#") and name.endswith("_total"):
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals
