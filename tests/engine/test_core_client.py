"""The engine core's IPC socket files: removed on every exit that can run code."""

from __future__ import annotations

import multiprocessing
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
import zmq

from kvflow.config import AsyncEngineArgs
from kvflow.engine import core as engine_core
from kvflow.engine import core_client
from kvflow.engine.core_proc import run_engine_core
from kvflow.engine.protocol import ReadyMessage


class _IdleCore:
    """An EngineCore that loads at once and never has work."""

    num_blocks = 4
    max_concurrency = 1.0

    def __init__(self, config: Any) -> None:
        pass

    def has_work(self) -> bool:
        return False

    def shutdown(self) -> None:  # the loop calls it when told to stop
        pass


def test_core_removes_its_socket_files_when_its_client_is_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_core, "EngineCore", _IdleCore)
    paths = [tmp_path / "kvflow-test-in", tmp_path / "kvflow-test-out"]
    ctx = zmq.Context()
    socks = [ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)]
    try:
        for sock, path in zip(socks, paths, strict=True):  # as MPClient binds them
            sock.bind(f"ipc://{path}")
        assert all(p.exists() for p in paths)
        ready_recv, ready_send = multiprocessing.Pipe(duplex=False)
        # A parent pid that is not this process's parent: the client "died" before the start.
        core = threading.Thread(target=run_engine_core, daemon=True,
                                args=(None, f"ipc://{paths[0]}", f"ipc://{paths[1]}",
                                      ready_send, -1))
        core.start()
        assert ready_recv.poll(10)
        ready: ReadyMessage = ready_recv.recv()
        assert ready.ok, ready.error
        core.join(timeout=10)  # the input thread checks its parent once a second
        assert not core.is_alive(), "the core did not stop without its client"
        assert not any(p.exists() for p in paths)
    finally:
        ctx.destroy(linger=0)


def test_failed_start_removes_socket_files(
        tmp_path: Path, tiny_llama_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: Any, ready: Any) -> None:
        raise RuntimeError("no handshake")

    config = AsyncEngineArgs(model=str(tiny_llama_path),
                             kv_cache_memory_gb=0.05).create_engine_config()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(core_client.MPClient, "_handshake", fail)
    before = set(multiprocessing.active_children())
    with pytest.raises(RuntimeError, match="no handshake"):
        core_client.MPClient(config)
    assert list(tmp_path.glob("kvflow-*")) == []
    assert set(multiprocessing.active_children()) == before
