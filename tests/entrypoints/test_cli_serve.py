"""`kvflow serve` as a process: API key, stop signals, engine death; `kvflow chat`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvflow.entrypoints.cli import build_parser
from tests.entrypoints.conftest import TINY_ARGS, TINY_ENGINE_ARGS, RemoteServer, pid_alive

KEY = "test-key-123"


@pytest.fixture(scope="module")
def keyed_server(tiny_llama_path: Path) -> Any:
    with RemoteServer([str(tiny_llama_path), "--served-model-name", "tiny", *TINY_ARGS],
                      env={"KVFLOW_API_KEY": KEY}, api_key=KEY) as server:
        yield server


def test_flags_come_from_the_engine_config() -> None:
    args = build_parser().parse_args(
        ["serve", "some/model", "--port", "9001", "--served-model-name", "a", "b",
         "--max-num-seqs", "3", "--no-enable-prefix-caching", "--api-key", "k"])
    assert (args.model, args.port, args.host) == ("some/model", 9001, "127.0.0.1")
    assert args.served_model_name == ["a", "b"] and args.api_key == "k"
    assert args.max_num_seqs == 3 and args.enable_prefix_caching is False
    assert build_parser().parse_args(["serve", "--model", "m"]).model_option == "m"
    bench = build_parser().parse_args(["bench", "serve", "--num-prompts", "8",
                                       "--max-concurrency", "2"])
    assert bench.num_prompts == 8 and bench.max_concurrency == 2


def test_api_key(keyed_server: RemoteServer) -> None:
    url = keyed_server.url("/v1/models")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.get(url, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(keyed_server.url("/health")).status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_server.url("/v1"), api_key="wrong",
                      max_retries=0).models.list()
    out = keyed_server.client().completions.create(model="tiny", prompt="a b c", max_tokens=2)
    assert out.usage is not None and out.usage.completion_tokens >= 1


def run_chat(args: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvflow.entrypoints.cli", "chat", *args],
                          input=stdin, capture_output=True, text=True, timeout=180)


def test_chat_command_against_a_server(keyed_server: RemoteServer) -> None:
    done = run_chat(["--url", keyed_server.url(), "--api-key", KEY, "--max-tokens", "4"],
                    "hello\nand again\n/exit\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("> ") == 3 and "[error" not in done.stdout


@pytest.mark.slow  # loads a model in the chat process; the --url test covers the chat loop
def test_chat_command_in_process(tiny_llama_path: Path) -> None:
    done = run_chat([str(tiny_llama_path), *TINY_ENGINE_ARGS, "--max-tokens", "4"], "hello\n")
    assert done.returncode == 0, done.stderr  # EOF ends the chat
    assert done.stdout.count("> ") == 2 and "[error" not in done.stdout


class StreamInThread:
    """A long streaming completion consumed in a thread; records how it ended."""

    def __init__(self, server: RemoteServer) -> None:
        self.client = server.client(timeout=60)
        self.started = threading.Event()
        self.outcome: str | BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            stream = self.client.completions.create(
                model=self.client.models.list().data[0].id, prompt="a b c", max_tokens=900,
                stream=True, extra_body={"ignore_eos": True})
            finish = None
            for chunk in stream:
                self.started.set()
                finish = chunk.choices[0].finish_reason if chunk.choices else finish
            self.outcome = finish or "ended without finish_reason"
        except BaseException as exc:
            self.outcome = exc
        finally:
            self.started.set()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream hangs"


class WholeRequestInThread:
    """A long non-streaming completion in a thread; records its response or error."""

    def __init__(self, server: RemoteServer, model: str) -> None:
        self.outcome: object = None
        self.thread = threading.Thread(target=self._run, args=(server.client(timeout=60), model),
                                       daemon=True)
        self.thread.start()

    def _run(self, client: openai.OpenAI, model: str) -> None:
        try:
            self.outcome = client.completions.create(
                model=model, prompt="a b c", max_tokens=1000, extra_body={"ignore_eos": True})
        except BaseException as exc:
            self.outcome = exc


def requests_in_engine(server: RemoteServer) -> float:
    """Running plus waiting requests, from /metrics."""
    text = httpx.get(server.url("/metrics"), timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(("kvflow:num_requests_running", "kvflow:num_requests_waiting")))


def ipc_socket_files(pid: int) -> set[Path]:
    """The kvflow IPC socket files process `pid` has bound: its socket fds in /proc/net/unix."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    files = set()
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        fields = line.split()  # Num RefCount Protocol Flags Type St Inode Path
        if len(fields) == 8 and fields[6] in inodes:
            path = Path(fields[7])
            if path.name.startswith("kvflow-") and path.name.endswith(("-in", "-out")):
                files.add(path)
    return files


def wait_gone(files: set[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while left := [f for f in files if f.exists()]:
        assert time.monotonic() < deadline, f"socket files left behind: {left}"
        time.sleep(0.1)


@contextlib.contextmanager
def dying_server(args: list[str]) -> Iterator[RemoteServer]:
    """A server expected to die (no exit-code check); its whole process group goes after."""
    server = RemoteServer(args)
    try:
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):  # the engine may outlive a killed server
            os.killpg(server.proc.pid, signal.SIGKILL)
        server.kill()
        server.log_file.close()
        os.unlink(server.log_file.name)


def test_engine_death_fails_requests_then_the_server_exits(tiny_llama_path: Path) -> None:
    with dying_server([str(tiny_llama_path), *TINY_ARGS]) as server:
        files = ipc_socket_files(server.proc.pid)
        assert len(files) == 2 and all(f.exists() for f in files), files
        whole = WholeRequestInThread(server, str(tiny_llama_path))
        stream = StreamInThread(server)
        assert stream.started.wait(60)
        deadline = time.monotonic() + 30
        while requests_in_engine(server) < 2:  # both requests are in the engine
            assert time.monotonic() < deadline, "the requests never reached the engine"
            time.sleep(0.05)
        os.kill(server.engine_pid(), signal.SIGKILL)
        stream.join(timeout=10)  # the SSE error event ends the stream
        assert isinstance(stream.outcome, openai.APIError), stream.outcome
        assert "died" in str(stream.outcome)
        whole.thread.join(timeout=10)
        assert isinstance(whole.outcome, openai.InternalServerError), whole.outcome
        assert whole.outcome.status_code == 503 and "died" in str(whole.outcome)
        try:  # then the server stops by itself, with an error code for its supervisor
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server outlived its engine:\n{server.log()}") from None
        assert server.proc.returncode == 1, server.log()
        assert "engine core died" in server.log()
        wait_gone(files, timeout=10)


def test_killed_server_leaves_no_socket_files(tiny_llama_path: Path) -> None:
    with dying_server([str(tiny_llama_path), *TINY_ARGS]) as server:
        files = ipc_socket_files(server.proc.pid)
        assert len(files) == 2 and all(f.exists() for f in files), files
        engine_pid = server.engine_pid()
        os.kill(server.proc.pid, signal.SIGKILL)  # the server only: its engine is left alone
        server.proc.wait(timeout=10)
        wait_gone(files, timeout=10)  # the engine notices, stops and removes them
        deadline = time.monotonic() + 10
        while pid_alive(engine_pid):
            assert time.monotonic() < deadline, "the engine outlived its server"
            time.sleep(0.1)


def test_sigterm_with_streams_in_flight(tiny_llama_path: Path) -> None:
    server = RemoteServer([str(tiny_llama_path), *TINY_ARGS])
    try:
        engine_pid = server.engine_pid()
        streams = [StreamInThread(server) for _ in range(3)]
        assert all(s.started.wait(60) for s in streams)
        took = server.stop(timeout=10)
        assert server.proc.returncode == 0, server.log()
        deadline = time.monotonic() + 10 - took
        while pid_alive(engine_pid):
            assert time.monotonic() < deadline, "the engine process outlived the server"
            time.sleep(0.1)
        for stream in streams:
            stream.join(timeout=5)
            assert stream.outcome == "abort", stream.outcome  # ended cleanly, not cut off
        with socket.socket() as sock:  # the port is free again for a new server
            # as uvicorn binds: closed connections may sit in TIME_WAIT on the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", server.port))
    finally:
        server.kill()
