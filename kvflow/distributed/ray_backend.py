"""Data-parallel replicas as Ray actors, on any node of a Ray cluster.

    client ── ray.init(address) ── placement group: one bundle per replica (its CPUs, a GPU)
      │  actor.run(config): builds the EngineCore, binds two TCP ZMQ sockets on its node's
      │                     IP, says where (ReadyMessage), runs the busy loop until shutdown
      ├─ ZMQ PUSH ──► actor's input socket      (the same messages as with a local process)
      ├─ ZMQ PULL ◄── actor's output socket
      └─ watcher thread: ray.get(run) ── returns at shutdown; RayActorError when it died

There is no process sentinel across machines: the long-running `run` call is the death
watch (Ray raises RayActorError in the watcher as soon as the actor's process is gone).
Ray is imported only here, and only when `data_parallel_backend="ray"`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

from kvflow.config import EngineConfig
from kvflow.engine.core_client import READY_TIMEOUT_S, CoreClient, OutputSink, RequestSender
from kvflow.engine.protocol import EngineCoreOutputs, ReadyMessage, RequestType

logger = logging.getLogger(__name__)


class EngineCoreActor:
    """Runs one engine core inside a Ray actor (a threaded actor: `run` holds one thread
    for the engine's life, `wait_ready` and `pid` answer on others)."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._message: ReadyMessage | None = None

    def run(self, config: EngineConfig) -> None:
        import ray

        from kvflow.engine.core import EngineCore
        from kvflow.engine.core_proc import serve_core

        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s engine-core: %(message)s")
        try:
            core = EngineCore(config)
        except BaseException as exc:
            self._say(ReadyMessage(ok=False, error=f"{type(exc).__name__}: {exc}"))
            raise
        host = ray.util.get_node_ip_address()
        serve_core(core, f"tcp://{host}:*", f"tcp://{host}:*", self._say,
                   parent_alive=lambda: True, bind=True)  # Ray ends actors with their owner

    def _say(self, message: ReadyMessage) -> None:
        self._message = message
        self._ready.set()

    def wait_ready(self) -> ReadyMessage:
        self._ready.wait()
        assert self._message is not None
        return self._message

    def pid(self) -> int:
        return os.getpid()


def connect_ray(address: str | None) -> None:
    """Join the Ray cluster at `address` (else RAY_ADDRESS, else one started on this machine
    with `ray start`, else a new local one), unless this process already has."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None)


class RayCoreClient(CoreClient):
    """One replica in a Ray actor: requests and outputs over TCP ZMQ, death through Ray."""

    def __init__(self, actor: Any, run_ref: Any, ready: ReadyMessage, sink: OutputSink,
                 on_close: Callable[[], None] = lambda: None) -> None:
        super().__init__(sink)
        import zmq

        self.actor = actor
        self.run_ref = run_ref
        self.num_kv_blocks = ready.num_kv_blocks
        self.max_concurrency = ready.max_concurrency
        self._on_close = on_close
        self.ctx = zmq.Context(io_threads=1)
        self.in_sock = self.ctx.socket(zmq.PUSH)
        self.in_sock.setsockopt(zmq.SNDTIMEO, 5000)
        self.in_sock.setsockopt(zmq.LINGER, 0)
        self.in_sock.connect(ready.input_address)
        self.out_sock = self.ctx.socket(zmq.PULL)
        self.out_sock.setsockopt(zmq.LINGER, 0)
        self.out_sock.connect(ready.output_address)
        self.sender = RequestSender(self.in_sock)
        self.thread = threading.Thread(target=self._receive, daemon=True,
                                       name="kvflow-ray-core-output")
        self.thread.start()
        self.watcher = threading.Thread(target=self._watch, daemon=True,
                                        name="kvflow-ray-core-watch")
        self.watcher.start()

    def _watch(self) -> None:
        """Wait on the actor's `run` call: it returns at shutdown and raises if it died."""
        import ray

        try:
            ray.get(self.run_ref)
            reason = "the engine core actor stopped unexpectedly"
        except Exception as exc:
            reason = f"the engine core actor died: {type(exc).__name__}: {exc}"
        if not self._closing:
            self._mark_dead(reason.splitlines()[0])

    def _receive(self) -> None:
        import zmq

        decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        while not self._closing and self.dead_error is None:
            try:
                if self.out_sock.poll(timeout=500):
                    self._deliver(decoder.decode(self.out_sock.recv(copy=False).buffer))
            except zmq.ZMQError:
                return  # context closed during shutdown

    def _send(self, kind: RequestType, payload: Any) -> None:
        import zmq

        try:
            self.sender.send(kind, payload)
        except zmq.ZMQError as exc:
            self._mark_dead(f"cannot reach the engine core actor: {exc}")
            self.check_alive()

    def shutdown(self) -> None:
        import ray

        if self._closing:
            return
        self._closing = True
        if self.dead_error is None:
            with contextlib.suppress(Exception):
                self._send(RequestType.SHUTDOWN, None)
            ray.wait([self.run_ref], timeout=5)  # the core saves what it must, then returns
        with contextlib.suppress(Exception):
            ray.kill(self.actor)
        self.thread.join(timeout=2)
        self.ctx.destroy(linger=0)
        self._on_close()


def start_ray_replicas(config: EngineConfig, sinks: list[Any]) -> list[RayCoreClient]:
    """One actor per replica in a placement group (one bundle each), all loading at once."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    dp = config.data_parallel_config
    assert dp is not None
    connect_ray(dp.address)
    cpus = config.num_threads or 1  # each replica's torch threads, and the CPUs it reserves
    # a replica's tensor-parallel ranks each hold a GPU (Ray hands the actor its own)
    gpus = config.tensor_parallel_size if config.model_config.device.type == "cuda" else 0
    bundle = {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}
    pg = placement_group([bundle] * len(sinks), strategy="SPREAD")
    ready, _ = ray.wait([pg.ready()], timeout=READY_TIMEOUT_S)
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(f"the Ray cluster cannot place {len(sinks)} replicas of {bundle} "
                           f"within {READY_TIMEOUT_S:.0f}s (resources: "
                           f"{ray.cluster_resources()})")
    replica_config = _with_threads(config, cpus)
    actor_class: Any = ray.remote(EngineCoreActor)
    actors: list[Any] = [actor_class.options(
        num_cpus=cpus, num_gpus=gpus, max_concurrency=4,
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=i)).remote()
        for i in range(len(sinks))]
    runs = [a.run.remote(replica_config) for a in actors]
    closed = _Countdown(len(sinks), lambda: remove_placement_group(pg))
    try:
        messages = [_await_ready(a, run) for a, run in zip(actors, runs, strict=True)]
    except BaseException:
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        remove_placement_group(pg)
        raise
    return [RayCoreClient(a, run, msg, sink, closed.tick)
            for a, run, msg, sink in zip(actors, runs, messages, sinks, strict=True)]


def _await_ready(actor: Any, run_ref: Any) -> ReadyMessage:
    """The actor's ReadyMessage; RuntimeError with the core's own error if it failed."""
    import ray

    ready_ref = actor.wait_ready.remote()
    deadline = time.monotonic() + READY_TIMEOUT_S
    done, _ = ray.wait([ready_ref, run_ref], num_returns=1, timeout=READY_TIMEOUT_S)
    if not done:
        raise RuntimeError(f"the engine core actor did not start within {READY_TIMEOUT_S:.0f}s")
    if run_ref in done and ready_ref not in done:
        try:
            ray.get(run_ref)
        except Exception as exc:
            raise RuntimeError(f"the engine core actor failed to start: {exc}") from None
        raise RuntimeError("the engine core actor exited while starting")
    message: ReadyMessage = ray.get(ready_ref, timeout=max(1.0, deadline - time.monotonic()))
    if not message.ok:
        raise RuntimeError(f"the engine core failed to start: {message.error}")
    return message


def _with_threads(config: EngineConfig, threads: int) -> EngineConfig:
    import dataclasses

    return dataclasses.replace(config, num_threads=threads)


class _Countdown:
    """Runs `action` once, when the last of `count` replicas has closed."""

    def __init__(self, count: int, action: Callable[[], None]) -> None:
        self.count = count
        self.action = action
        self.lock = threading.Lock()

    def tick(self) -> None:
        with self.lock:
            self.count -= 1
            last = self.count == 0
        if last:
            with contextlib.suppress(Exception):
                self.action()
