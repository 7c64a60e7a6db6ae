"""Helpers for the hostile-client tests: watchers that run beside a case, error and leak checks.

    with watch(server) as w:      # /health poller + RSS sampler, in threads
        r = post(server, ...)      # the hostile request
        assert_error(r, 400, "n")  # OpenAI's error shape, the status, the param, fast enough
    # on exit: worst /health latency, RSS rise and residue, no request state left in /metrics
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.entrypoints.conftest import RemoteServer

# The gauges that must fall back to 0 once every request has ended, one way or another.
LEAK_GAUGES = ("kvflow:frontend_requests", "kvflow:num_requests_running",
               "kvflow:num_requests_waiting", "kvflow:kv_cache_usage_perc")
ERROR_KEYS = {"message", "type", "param", "code"}

# Thresholds, measured over this suite's cases on the 2-core machine with another test suite
# running beside it (fresh TINY server: ~393 MB server process, ~850 MB engine core):
# - /health: < 0.1 s for almost every refusal, <= 0.85 s while a 15 MB body of millions of ints
#   is parsed; a held event loop shows as 2.5-10 s or a reset connection. 2 s tells them apart.
MAX_HEALTH_S = 2.0
# - RSS rise during a case: 10 MB prompts +10-26 MB, 1M-entry lists +35 MB, 15 MB bodies of
#   millions of ints +185 MB (the most an accepted-as-honest case reaches); 1.2M chat messages
#   +850-1000 MB. The engine core never rose > 10 MB (its KV cache is preallocated).
MAX_RSS_RISE_MB = 300.0
# - RSS left after a case (glibc keeps some freed arenas): <= 40 MB; a request whose work goes
#   on after its answer keeps hundreds of MB.
MAX_RSS_RESIDUE_MB = 100.0
# A refusal is answered in < 0.3 s on an idle machine; 5 s leaves room for two shared cores.
ANSWER_WITHIN_S = 5.0


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (VmRSS, in MiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class _Poller:
    """Calls `sample()` every `interval_s` in a daemon thread until stopped."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self.sample()  # the baseline, before the case sends anything
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.sample()  # the end, after the case


class HealthWatcher(_Poller):
    """Polls GET /health; the worst latency seen (a failed or non-200 probe counts as inf)."""

    def __init__(self, url: str, interval_s: float = 0.1, timeout_s: float = 10.0) -> None:
        super().__init__(interval_s)
        self.url = url
        self.client = httpx.Client(timeout=timeout_s)
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def sample(self) -> None:
        start = time.monotonic()
        try:
            status = self.client.get(self.url).status_code
        except httpx.HTTPError as exc:
            status, reason = 0, repr(exc)
        else:
            reason = f"status {status}"
        self.latencies.append(time.monotonic() - start)
        if status != 200:
            self.failures.append(reason)

    @property
    def worst_s(self) -> float:
        return float("inf") if self.failures else max(self.latencies, default=0.0)

    def stop(self) -> None:
        super().stop()
        self.client.close()


class MemoryWatcher(_Poller):
    """Samples VmRSS of some processes: baseline (first), peak and last sample of each."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.05) -> None:
        super().__init__(interval_s)
        self.pids = pids
        self.samples: dict[str, list[float]] = {name: [] for name in pids}

    def sample(self) -> None:
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError, AssertionError):  # a process that just died
                self.samples[name].append(rss_mb(pid))

    def rise_mb(self, name: str) -> float:
        values = self.samples[name]
        return max(values) - values[0]

    def residue_mb(self, name: str) -> float:
        values = self.samples[name]
        return values[-1] - values[0]

    def summary(self) -> str:
        return ", ".join(f"{name}: {v[0]:.0f} -> peak {max(v):.0f} -> {v[-1]:.0f} MB"
                         for name, v in self.samples.items() if v)


@dataclass
class Watch:
    """What the watchers saw during one case (readable after the `watch` block)."""

    health: HealthWatcher
    memory: MemoryWatcher


@contextlib.contextmanager
def watch(server: RemoteServer, *, max_health_s: float = MAX_HEALTH_S,
          max_rise_mb: float = MAX_RSS_RISE_MB, max_residue_mb: float = MAX_RSS_RESIDUE_MB,
          leak_timeout_s: float = 10.0) -> Iterator[Watch]:
    """Run a case under a /health poller and an RSS sampler; check both and the leaks after.

    The RSS limits bind the server (HTTP) process, where hostile input is parsed, and the
    engine core, which must not grow from what the server lets through.
    """
    pids = {"server": server.proc.pid, "engine": server.engine_pid()}
    health = HealthWatcher(server.url("/health"))
    memory = MemoryWatcher(pids)
    health.start()
    memory.start()
    result = Watch(health, memory)
    try:
        yield result
    finally:
        health.stop()
        # Leftover state is checked before the memory's end sample: the last request may
        # still be unwinding in the server when the client already has its answer.
        leftovers = wait_for_no_leftovers(server, leak_timeout_s)
        memory.stop()
    assert health.worst_s < max_health_s, (
        f"/health took {health.worst_s:.2f} s (failures: {health.failures[:3]})")
    seen = memory.summary()
    for name in pids:
        assert memory.rise_mb(name) < max_rise_mb, f"{name} RSS rose too far: {seen}"
        assert memory.residue_mb(name) < max_residue_mb, f"{name} RSS stayed up: {seen}"
    assert not leftovers, f"request state left after the case: {leftovers}"


def gauges(server: RemoteServer) -> dict[str, float]:
    """The leak gauges' values from /metrics."""
    values: dict[str, float] = {}
    for line in httpx.get(server.url("/metrics"), timeout=10).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in LEAK_GAUGES:
            values[name] = float(line.rsplit(" ", 1)[1])
    missing = set(LEAK_GAUGES) - set(values)
    assert not missing, f"/metrics lacks {sorted(missing)}"
    return values


def wait_for_no_leftovers(server: RemoteServer, timeout_s: float = 10.0) -> dict[str, float]:
    """Poll /metrics until every leak gauge is 0; return the non-zero ones at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        nonzero = {k: v for k, v in gauges(server).items() if v != 0}
        if not nonzero or time.monotonic() > deadline:
            return nonzero
        time.sleep(0.2)


def post(server: RemoteServer, path: str, body: Any, timeout_s: float = 60.0,
         **headers: str) -> httpx.Response:
    """POST a dict as JSON or bytes as they are (invalid JSON and invalid UTF-8 included)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url(path), content=data, timeout=timeout_s,
                      headers={"content-type": "application/json", **headers})


def assert_error(response: httpx.Response, status: int | tuple[int, ...],
                 param: str | None = None, within_s: float = ANSWER_WITHIN_S,
                 contains: str | None = None) -> dict[str, Any]:
    """An OpenAI-shaped JSON error with this status (and param, and message text), fast."""
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert response.headers.get("content-type", "").startswith("application/json"), (
        response.headers.get("content-type"), response.text[:200])
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["code"] == response.status_code, error
    if param is not None:  # pydantic's path into the field ("stop_token_ids.0") names it too
        assert error["param"] == param or str(error["param"]).startswith(param + "."), error
    if contains is not None:
        assert contains.lower() in error["message"].lower(), error
    elapsed = response.elapsed.total_seconds()
    assert elapsed < within_s, f"answered in {elapsed:.2f} s: {error}"
    return dict(error)


# ---- raw HTTP ---------------------------------------------------------------------------
@dataclass
class RawAnswer:
    """What came back on a raw socket: the status (None: closed without one) and when."""

    status: int | None
    seconds: float
    head: bytes
    body: bytes


def send_partial_body(port: int, path: str, declared: int, sent: bytes,
                      wait_s: float) -> RawAnswer:
    """Announce `declared` body bytes, send only `sent`, and wait for the server's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {declared}\r\n\r\n").encode()
        sock.sendall(head + sent)
        return read_response(sock, wait_s)


def read_response(sock: socket.socket, wait_s: float) -> RawAnswer:
    """One HTTP/1.1 response (by its Content-Length), or what arrived before close/timeout."""
    start = time.monotonic()
    data = b""
    sock.settimeout(wait_s)
    with contextlib.suppress(TimeoutError, ConnectionError):
        while True:
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep and len(rest) >= _content_length(head):
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    seconds = time.monotonic() - start
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None
    return RawAnswer(status, seconds, head, body)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0
