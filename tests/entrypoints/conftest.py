"""A real `kvflow serve` process on a free loopback port, for the server tests."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

DEFAULT_MODEL = "smollm2-135m-instruct"
# Small KV cache and context, one torch thread: on a busy 2-core machine, two spinning
# torch threads in the engine are ~10x slower than one.
SERVER_ARGS = ["--kv-cache-memory-gb", "0.25", "--max-model-len", "2048", "--num-threads", "1",
               "--disable-log-stats"]
TINY_ENGINE_ARGS = ["--kv-cache-memory-gb", "0.05", "--max-model-len", "1024",
                    "--num-threads", "1", "--disable-log-stats"]
TINY_ARGS = [*TINY_ENGINE_ARGS, "--disable-access-log"]
STARTUP_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the test process dies (Linux prctl)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def child_pids(pid: int) -> list[int]:
    """Direct children of a process, from /proc (every thread lists its own)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class RemoteServer:
    """`python -m kvflow.entrypoints.cli serve ...` as a subprocess; a context manager."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 api_key: str | None = None) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 (lives with the server)
            mode="w+", prefix="kvflow-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "kvflow.entrypoints.cli", "serve", *args,
               "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvflow serve exited with {self.proc.returncode}:\n"
                                   f"{self.log()}")
            try:
                if httpx.get(self.url("/health"), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.kill()
        raise RuntimeError(f"kvflow serve did not become healthy:\n{self.log()}")

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def client(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url("/v1"), api_key=self.api_key or "none",
                             max_retries=0, **kwargs)

    def async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url("/v1"), api_key=self.api_key or "none",
                                  max_retries=0, **kwargs)

    def engine_pid(self) -> int:
        """The engine-core process: the server's child started by multiprocessing spawn."""
        for pid in child_pids(self.proc.pid):
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
        raise AssertionError(f"no engine-core child of {self.proc.pid}")

    def log(self) -> str:
        self.log_file.flush()
        return Path(self.log_file.name).read_text()

    def stop(self, timeout: float = 15.0) -> float:
        """SIGTERM; return the seconds until the process exited (it must, within timeout)."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"kvflow serve ignored SIGTERM:\n{self.log()}") from None
        return time.monotonic() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> RemoteServer:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
            assert self.proc.returncode == 0, f"exit code {self.proc.returncode}:\n{self.log()}"
        finally:
            self.kill()
            self.log_file.close()
            os.unlink(self.log_file.name)


@pytest.fixture(scope="module")
def default_server() -> Any:
    with RemoteServer(SERVER_ARGS) as server:
        yield server
