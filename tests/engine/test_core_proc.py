"""The engine core's busy loop: hands freed heap memory back once it goes idle."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from kvflow.engine import core_proc
from kvflow.engine.protocol import EngineCoreOutputs, RequestType


class _Core:
    """Has work for `steps` steps after each ADD."""

    def __init__(self) -> None:
        self.left = 0
        self.steps = 0

    def has_work(self) -> bool:
        return self.left > 0

    def shutdown(self) -> None:  # the loop calls it when told to stop
        pass

    def step(self) -> EngineCoreOutputs:
        self.left -= 1
        self.steps += 1
        return EngineCoreOutputs(outputs=[])

    def add_request(self, request: Any) -> None:
        self.left = 3


def test_idle_loop_releases_memory_once_per_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    core = _Core()
    monkeypatch.setattr(core_proc, "TRIM_AFTER_IDLE_S", 0.05)
    monkeypatch.setattr(core_proc, "release_freed_memory", lambda: trims.append(core.steps))
    monkeypatch.setattr(core_proc.BusyLoop, "_handle",
                        lambda self, item: core.add_request(item[1]) if item[0] == RequestType.ADD
                        else setattr(self, "running", False))
    loop = core_proc.BusyLoop(core, send=lambda outputs: None)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    time.sleep(0.3)
    assert trims == []  # idle from the start: nothing was used, nothing to hand back
    loop.inputs.put((RequestType.ADD, None))
    time.sleep(0.3)
    assert trims == [3]  # one burst of three steps, then one trim while idle
    loop.inputs.put((RequestType.ADD, None))
    time.sleep(0.3)
    assert trims == [3, 6]
    loop.inputs.put((RequestType.ABORT, None))
    thread.join(timeout=5)
    assert not thread.is_alive()
