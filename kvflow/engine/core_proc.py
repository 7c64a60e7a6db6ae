"""The engine core's busy loop, and the entry point of the engine-core process.

    client ─ZMQ─► input thread ─queue─► busy loop: handle inputs, step() ─ZMQ─► client

The input thread decodes requests while the model runs, so aborts and new requests are
never stuck behind a long step; the busy loop picks them up between steps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import msgspec

from kvflow.config import EngineConfig
from kvflow.engine.protocol import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    FinishReason,
    ReadyMessage,
    RequestType,
    UtilityOutput,
    UtilityRequest,
)
from kvflow.logger import configure_engine_core_logging
from kvflow.model.hugepages import release_freed_memory

if TYPE_CHECKING:
    from kvflow.engine.core import EngineCore

logger = logging.getLogger(__name__)

# Methods of EngineCore a client may call by name.
UTILITY_METHODS = frozenset(
    {"pause", "resume", "get_stats", "reset_prefix_cache", "num_unfinished_requests",
     "add_lora", "remove_lora", "list_loras", "pin_lora", "reset_mm_cache", "sleep",
     "wake_up", "is_sleeping"}
)

InputItem = tuple[RequestType, Any]

# The CPU runner keeps freed step memory in the heap while it works (keep_freed_memory);
# after this long without work the loop hands it back, so an idle engine is back at weights +
# KV cache + runtime.
TRIM_AFTER_IDLE_S = 0.5
# An idle loop checks the core's health this often (tensor-parallel workers).
HEALTH_CHECK_S = 1.0


class BusyLoop:
    """Runs an EngineCore: applies inputs from a queue between steps, sends every output."""

    def __init__(self, core: Any, send: Callable[[EngineCoreOutputs], None]) -> None:
        self.core = core
        self.send = send
        self.inputs: queue.Queue[InputItem] = queue.Queue()
        self.running = True

    def run(self) -> None:
        stepped = False  # a step ran since memory was last handed back
        while self.running:
            if not self.core.has_work():
                try:  # idle: block until something arrives
                    item = self.inputs.get(timeout=TRIM_AFTER_IDLE_S)
                except queue.Empty:
                    if stepped:  # idle a while: the steps' freed heap goes back to the OS
                        release_freed_memory()
                        stepped = False
                    item = self._wait_for_input()
                self._handle(item)
            while self.running and not self.inputs.empty():
                self._handle(self.inputs.get_nowait())
            if self.running and self.core.has_work():
                outputs = self.core.step()
                stepped = True
                if outputs.outputs or outputs.kv_events is not None:
                    if self.core.config.log_stats:
                        outputs.scheduler_stats = self.core.get_stats()
                    self.send(outputs)
        self.core.shutdown()  # told to stop (a failure skips this: nothing is saved then)

    def _wait_for_input(self) -> InputItem:
        """Block until an input arrives, checking every second that the engine is whole (a
        dead tensor-parallel worker raises here, and the engine dies visibly)."""
        while True:
            try:
                return self.inputs.get(timeout=HEALTH_CHECK_S)
            except queue.Empty:
                self.core.check_health()

    def _handle(self, item: InputItem) -> None:
        kind, payload = item
        if kind == RequestType.ADD:
            try:
                self.core.add_request(payload)
            except Exception as exc:  # a bad request ends itself, never the loop
                out = EngineCoreOutput(
                    payload.request_id, [], finish_reason=FinishReason.ERROR, error=str(exc)
                )
                self.send(EngineCoreOutputs([out], time.time()))
        elif kind == RequestType.ABORT:
            self.core.abort_requests(payload)
        elif kind == RequestType.UTILITY:
            answer = self._call(payload)
            take_events = getattr(self.core, "take_kv_events", None)  # (test cores lack it)
            events = take_events() if take_events is not None else None
            self.send(EngineCoreOutputs(utility_output=answer, kv_events=events))
        elif kind == RequestType.SHUTDOWN:
            self.running = False

    def _call(self, call: UtilityRequest) -> UtilityOutput:
        if call.method not in UTILITY_METHODS:
            return UtilityOutput(call.call_id, error=f"unknown utility method {call.method!r}")
        try:
            return UtilityOutput(call.call_id, result=getattr(self.core, call.method)(*call.args))
        except ValueError as exc:
            return UtilityOutput(call.call_id, error=str(exc), invalid_argument=True)
        except Exception as exc:
            return UtilityOutput(call.call_id, error=f"{type(exc).__name__}: {exc}")


def _decode_input(frames: list[bytes]) -> InputItem:
    kind = RequestType(frames[0])
    if kind == RequestType.ADD:
        return kind, msgspec.msgpack.decode(frames[1], type=EngineCoreRequest)
    if kind == RequestType.ABORT:
        return kind, msgspec.msgpack.decode(frames[1], type=list[str])
    if kind == RequestType.UTILITY:
        return kind, msgspec.msgpack.decode(frames[1], type=UtilityRequest)
    return kind, None


def _input_thread(sock: Any, loop: BusyLoop, parent_alive: Callable[[], bool]) -> None:
    """Receive and decode client messages; stop the core if the client process vanishes."""
    import zmq

    while True:
        if sock.poll(timeout=1000, flags=zmq.POLLIN):
            item = _decode_input(sock.recv_multipart(copy=True))
            loop.inputs.put(item)
            if item[0] == RequestType.SHUTDOWN:
                return
        elif not parent_alive():  # the client died without saying goodbye
            loop.inputs.put((RequestType.SHUTDOWN, None))
            return


def run_engine_core(
    config: EngineConfig, input_addr: str, output_addr: str, ready: Connection, parent_pid: int
) -> None:
    """Entry point of the engine-core process: load, handshake, loop until told to stop."""
    configure_engine_core_logging()
    try:
        core = _load_core(config, ready)
        if core is not None:
            serve_core(core, input_addr, output_addr, ready.send,
                       lambda: os.getppid() == parent_pid)
    finally:
        # The client removes these too, but a client killed with SIGKILL cannot: then this
        # process, which stops once its parent is gone, is the last one that knows them.
        remove_ipc_files([input_addr, output_addr])


def remove_ipc_files(addrs: list[str]) -> None:
    """Unlink the socket files behind `ipc://` addresses; already gone is fine."""
    for addr in addrs:
        if addr.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(addr.removeprefix("ipc://"))


def _load_core(config: EngineConfig, ready: Connection) -> EngineCore | None:
    """The EngineCore, or None after telling the client why it could not be built."""
    try:
        from kvflow.engine.core import EngineCore

        return EngineCore(config)
    except BaseException as exc:
        ready.send(ReadyMessage(ok=False, error=f"{type(exc).__name__}: {exc}"))
        return None


def serve_core(core: EngineCore, input_addr: str, output_addr: str,
               on_ready: Callable[[ReadyMessage], None], parent_alive: Callable[[], bool],
               bind: bool = False) -> None:
    """Open the sockets, say ready, run the busy loop until shutdown or a failure.

    A core in a child process connects to the client's sockets; a core the client cannot
    start itself (a Ray actor, maybe on another machine) binds its own (`bind`, addresses
    such as tcp://10.0.0.5:*) and says in its ReadyMessage where they ended up.
    """
    import zmq

    ctx = zmq.Context(io_threads=1)
    in_sock = ctx.socket(zmq.PULL)
    out_sock = ctx.socket(zmq.PUSH)
    out_sock.setsockopt(zmq.LINGER, 1000)
    if bind:
        in_sock.bind(input_addr)
        out_sock.bind(output_addr)
        input_addr = in_sock.getsockopt_string(zmq.LAST_ENDPOINT)
        output_addr = out_sock.getsockopt_string(zmq.LAST_ENDPOINT)
    else:
        in_sock.connect(input_addr)
        out_sock.connect(output_addr)
    encoder = msgspec.msgpack.Encoder()

    def send(outputs: EngineCoreOutputs) -> None:
        out_sock.send(encoder.encode(outputs), copy=False)

    loop = BusyLoop(core, send)
    threading.Thread(
        target=_input_thread,
        args=(in_sock, loop, parent_alive),
        daemon=True,
        name="kvflow-core-input",
    ).start()
    on_ready(ReadyMessage(ok=True, num_kv_blocks=core.num_blocks,
                          max_concurrency=core.max_concurrency,
                          input_address=input_addr if bind else "",
                          output_address=output_addr if bind else ""))
    try:
        loop.run()
    except BaseException as exc:
        logger.error("engine core failed:\n%s", traceback.format_exc())
        out_sock.send(
            encoder.encode(EngineCoreOutputs(engine_error=f"{type(exc).__name__}: {exc}"))
        )
        raise
    finally:
        # The input thread still owns in_sock; process exit reclaims it and the context.
        out_sock.close(linger=1000)
