"""Clients of the engine core: in its own process over ZMQ, or in a thread of this one.

Both deliver core outputs to asyncio code through `OutputBridge`, answer utility calls
with futures, and turn a dead core into `EngineDeadError` for everything pending.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import multiprocessing
import os
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from kvflow.config import EngineConfig
from kvflow.engine.core_proc import BusyLoop, run_engine_core
from kvflow.engine.protocol import (
    EngineCoreOutputs,
    EngineCoreRequest,
    ReadyMessage,
    RequestType,
    SchedulerStats,
    UtilityRequest,
)
from kvflow.errors import EngineDeadError

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = float(os.environ.get("KVFLOW_ENGINE_READY_TIMEOUT", "300"))


T = TypeVar("T")


class OutputSink(Protocol):
    """Where a core client hands what its core sends (its own bridge, or a replica set's)."""

    def push(self, item: EngineCoreOutputs | BaseException) -> None: ...


class RequestsFailed(Exception):  # noqa: N818 (a message to the output handler, not a fault)
    """Some requests ended with `error` while the engine as a whole lives on (one replica of
    several died); the output handler fails those streams and goes on."""

    def __init__(self, request_ids: list[str], error: EngineDeadError) -> None:
        super().__init__(str(error))
        self.request_ids = request_ids
        self.error = error


class OutputBridge(Generic[T]):
    """A thread-safe hand-over from a background thread to whichever event loop awaits.

    An exception pushed stays at the head: every later get() raises it.
    """

    def __init__(self) -> None:
        self._items: collections.deque[T | BaseException] = collections.deque()
        self._lock = threading.Lock()
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def push(self, item: T | BaseException) -> None:
        with self._lock:
            self._items.append(item)
            waiter, loop = self._waiter, self._loop
            self._waiter = None
        if waiter is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(_wake, waiter)

    async def get(self) -> T:
        while True:
            with self._lock:
                if self._items:
                    item = self._items[0]
                    if not isinstance(item, BaseException):
                        self._items.popleft()  # an error stays, for every later caller
                        return item
                    raise item
                self._loop = asyncio.get_running_loop()
                self._waiter = waiter = self._loop.create_future()
            await waiter


# How long an idle OpenMP thread of the engine core spins before it sleeps (libgomp reads
# this when torch loads, so it is set in the environment the core process starts with).
# libgomp's default spins for far longer, so between ops the core's threads held every core
# and the client process waited for a time slice: at 64 streams on 2 cores the median
# sampling-to-consumer latency went from 2.05 to 1.64 ms with this, at the same throughput.
_CORE_GOMP_SPINCOUNT = "20000"


@contextlib.contextmanager
def _core_environment() -> Iterator[None]:
    """Environment for starting the core process; the user's own settings win."""
    added = "GOMP_SPINCOUNT" not in os.environ
    if added:
        os.environ["GOMP_SPINCOUNT"] = _CORE_GOMP_SPINCOUNT
    try:
        yield
    finally:
        if added:
            os.environ.pop("GOMP_SPINCOUNT", None)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class RequestSender:
    """Encodes requests and pushes them into an engine core's input socket (callers on any
    thread; raises zmq.ZMQError when the core cannot be reached)."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self._encoder = msgspec.msgpack.Encoder()
        self._lock = threading.Lock()

    def send(self, kind: RequestType, payload: Any) -> None:
        frames = [kind.value] if payload is None else [kind.value, self._encoder.encode(payload)]
        with self._lock:
            self.sock.send_multipart(frames, copy=False)


class CoreClient:
    """What AsyncLLM needs from a core: send, receive, call utilities, detect death."""

    def __init__(self, sink: OutputSink | None = None) -> None:
        self.bridge: OutputBridge[EngineCoreOutputs] = OutputBridge()
        self.sink: OutputSink = sink if sink is not None else self.bridge
        self.dead_error: EngineDeadError | None = None
        self.num_kv_blocks = 0
        self.max_concurrency = 0.0
        self._call_ids = itertools.count()
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}
        self._closing = False

    def _deliver(self, outputs: EngineCoreOutputs) -> None:
        """Route one message from the core (runs on the receiving thread)."""
        if outputs.utility_output is not None:
            answer = outputs.utility_output
            entry = self._calls.pop(answer.call_id, None)
            if entry is not None:
                loop, fut = entry
                error = ValueError if answer.invalid_argument else RuntimeError
                result: Any = error(answer.error) if answer.error else answer.result
                loop.call_soon_threadsafe(_settle, fut, result)
            if outputs.kv_events is not None:  # (a cache reset): the router's index
                self.sink.push(EngineCoreOutputs(kv_events=outputs.kv_events))
        elif outputs.engine_error is not None:
            self._mark_dead(f"the engine core failed: {outputs.engine_error}")
        else:
            self.sink.push(outputs)

    def _mark_dead(self, reason: str) -> None:
        if self.dead_error is not None or self._closing:
            return
        logger.error("%s", reason)
        self.dead_error = EngineDeadError(reason)
        self.sink.push(self.dead_error)
        for loop, fut in list(self._calls.values()):
            if not loop.is_closed():
                loop.call_soon_threadsafe(_settle, fut, self.dead_error)
        self._calls.clear()

    def check_alive(self) -> None:
        """Raise EngineDeadError if the engine can serve no request any more."""
        if self.dead_error is not None:
            raise self.dead_error

    def check_health(self) -> None:
        """Raise EngineDeadError if any part of the engine died (a replica set: any one)."""
        self.check_alive()

    def engine_stats(self) -> list[SchedulerStats | None] | None:
        """Each replica's latest stats (data parallel); None for a single core."""
        return None

    def routed_counts(self) -> list[int]:
        """Requests sent to each core since start (data parallel: the router's choices)."""
        return []

    async def get_output(self) -> EngineCoreOutputs:
        return await self.bridge.get()

    async def call_utility(self, method: str, *args: Any) -> Any:
        self.check_alive()
        call_id = next(self._call_ids)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._calls[call_id] = (loop, fut)
        self._send(RequestType.UTILITY, UtilityRequest(call_id, method, list(args)))
        return await fut

    async def call_each(self, method: str, *args: Any) -> list[Any]:
        """A utility call on every core, one result each (a replica set: None for a dead
        replica); a single core answers alone."""
        return [await self.call_utility(method, *args)]

    def add_request(self, request: EngineCoreRequest, affinity: str | None = None) -> None:
        """Queue a request. Requests with one `affinity` (the children of an n > 1 request)
        run on one core; a single core ignores it."""
        self.check_alive()
        self._send(RequestType.ADD, request)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids and self.dead_error is None:
            self._send(RequestType.ABORT, request_ids)

    def _send(self, kind: RequestType, payload: Any) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


def _settle(fut: asyncio.Future[Any], result: Any) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


def make_core_client(config: EngineConfig, multiprocess: bool = True) -> CoreClient:
    """The client AsyncLLM talks to: one core (a process, or a thread), or a replica set."""
    if config.data_parallel_config is not None:
        if not multiprocess:
            raise ValueError("data_parallel_size > 1 runs each replica in its own process: "
                             "it needs multiprocess=True")
        # (imported here: the distributed package builds on this module)
        from kvflow.distributed.data_parallel import DataParallelClient

        return DataParallelClient.start(config)
    return MPClient(config) if multiprocess else InprocClient(config)


class InprocClient(CoreClient):
    """The core in a thread of this process: same behaviour, easy to debug."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        from kvflow.engine.core import EngineCore

        core = EngineCore(config)
        self.num_kv_blocks = core.num_blocks
        self.max_concurrency = core.max_concurrency
        self.loop = BusyLoop(core, self._deliver)
        self.core = core
        self.thread = threading.Thread(target=self._run, daemon=True, name="kvflow-core")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.loop.run()
        except BaseException as exc:
            logger.exception("engine core thread failed")
            self._mark_dead(f"the engine core failed: {type(exc).__name__}: {exc}")

    def _send(self, kind: RequestType, payload: Any) -> None:
        self.loop.inputs.put((kind, payload))

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.loop.inputs.put((RequestType.SHUTDOWN, None))
        self.thread.join(timeout=10)


class MPClient(CoreClient):
    """The core in its own process; requests and outputs cross ZMQ as msgpack."""

    def __init__(self, config: EngineConfig, sink: OutputSink | None = None) -> None:
        super().__init__(sink)
        import zmq

        base = os.path.join(tempfile.gettempdir(), f"kvflow-{uuid.uuid4().hex[:12]}")
        self._paths = [base + "-in", base + "-out"]
        self.ctx = zmq.Context(io_threads=1)
        self.in_sock = self.ctx.socket(zmq.PUSH)
        self.in_sock.setsockopt(zmq.SNDTIMEO, 5000)
        self.in_sock.setsockopt(zmq.LINGER, 0)
        self.out_sock = self.ctx.socket(zmq.PULL)
        self.out_sock.setsockopt(zmq.LINGER, 0)
        self.sender = RequestSender(self.in_sock)
        mp = multiprocessing.get_context("spawn")
        ready_recv, ready_send = mp.Pipe(duplex=False)
        self.proc = mp.Process(
            target=run_engine_core, name="kvflow-engine-core", daemon=True,
            args=(config, "ipc://" + self._paths[0], "ipc://" + self._paths[1], ready_send,
                  os.getpid()),
        )
        # Registered before the first bind: every way out, a failed start included, stops
        # the core and removes the socket files. (A client killed with SIGKILL runs none of
        # it; its core then removes them when it notices and exits.)
        self._finalizer = weakref.finalize(self, _cleanup, self.proc, self.ctx, self._paths)
        try:
            self.in_sock.bind("ipc://" + self._paths[0])
            self.out_sock.bind("ipc://" + self._paths[1])
            with _core_environment():
                self.proc.start()
            ready_send.close()
            self._handshake(ready_recv)
        except BaseException:
            self._closing = True
            self._finalizer()
            raise
        self.thread = threading.Thread(target=self._receive, daemon=True,
                                       name="kvflow-core-output")
        self.thread.start()

    def _handshake(self, ready: Any) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.poll(0.1):
            if not self.proc.is_alive():
                raise RuntimeError(
                    f"the engine core process exited with code {self.proc.exitcode} while "
                    "starting (out of memory, or a crash while loading the model?)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the engine core did not start within {READY_TIMEOUT_S:.0f}s")
        try:
            msg: ReadyMessage = ready.recv()
        except EOFError as exc:
            raise RuntimeError("the engine core process exited while starting") from exc
        if not msg.ok:
            raise RuntimeError(f"the engine core failed to start: {msg.error}")
        self.num_kv_blocks = msg.num_kv_blocks
        self.max_concurrency = msg.max_concurrency

    def _receive(self) -> None:
        """Output thread: decode core messages; notice the core process dying."""
        import zmq

        decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        poller = zmq.Poller()
        poller.register(self.out_sock, zmq.POLLIN)
        poller.register(self.proc.sentinel, zmq.POLLIN)
        while not self._closing:
            try:
                events = dict(poller.poll(timeout=1000))
            except zmq.ZMQError:
                return  # context closed during shutdown
            if self.out_sock in events:
                self._deliver(decoder.decode(self.out_sock.recv(copy=False).buffer))
            elif self.proc.sentinel in events or not self.proc.is_alive():
                self.proc.join(timeout=1)
                self._mark_dead(
                    f"the engine core process died unexpectedly (exit code {self.proc.exitcode})")
                return

    def _send(self, kind: RequestType, payload: Any) -> None:
        import zmq

        try:
            self.sender.send(kind, payload)
        except zmq.ZMQError as exc:
            self._mark_dead(f"cannot reach the engine core: {exc}")
            self.check_alive()

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True  # from here on, the core exiting is expected, not a death
        if self.dead_error is None and self.proc.is_alive():
            with contextlib.suppress(Exception):
                self._send(RequestType.SHUTDOWN, None)
            self.proc.join(timeout=5)
        self.thread.join(timeout=2)
        self._finalizer()


def _cleanup(proc: Any, ctx: Any, paths: list[str]) -> None:
    """Stop the core process for good and release sockets (also runs at interpreter exit)."""
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout=5)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout=5)
    ctx.destroy(linger=0)
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)
