"""Executors: what runs the model for an engine core.

    tensor_parallel_size 1: UniprocExecutor, the engine core's own ModelRunner.
    tensor_parallel_size N: MultiprocExecutor. The engine core is rank 0 (it schedules,
      broadcasts each step's WorkerStep, samples); ranks 1..N-1 are worker processes
      (kvflow.distributed.tp_worker) that load their shards and run the same forwards.

    engine core (rank 0)                         worker (rank r)
    Scheduler.schedule()
    ModelRunner.execute ── WorkerStep ─ gloo broadcast ─► run_step
      forward on its shard  ◄─ all-reduce ×2 per layer ─►   forward on its shard
      sample ◄──────────── logits slices, gloo gather ──    its vocabulary slice

A watcher thread polls the workers: one that dies makes check_health() raise, aborts any
all-reduce rank 0 waits in, and (in an engine-core process) ends the core, so every stream
gets EngineDeadError. Workers exit when the engine core's process is gone.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import torch
import torch.distributed as dist

from kvflow.config import EngineConfig
from kvflow.distributed.parallel_state import (
    ModelShards,
    SharedMemoryAllReduce,
    TensorParallelGroup,
    create_shared_area,
)
from kvflow.engine.protocol import WorkerStep
from kvflow.worker.model_runner import SAMPLE_ROWS, ModelRunner

if TYPE_CHECKING:
    from kvflow.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.2
STARTUP_TIMEOUT_S = 300.0


class UniprocExecutor:
    """One rank: the runner lives in the engine core, nothing to watch."""

    def __init__(self, config: EngineConfig) -> None:
        self.runner = ModelRunner(config)

    def check_health(self, wait_s: float = 0.0) -> None:
        pass

    def shutdown(self) -> None:
        pass


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to join the group (pickled to its stdin)."""

    config: EngineConfig
    rank: int
    world: int
    store_port: int
    shm_fd: int | None  # the shared all-reduce area, inherited (CPU ranks)
    shm_capacity: int
    cpus: list[int] | None  # CPUs to pin to; None leaves the affinity alone
    num_threads: int
    parent_pid: int


class RankContext:
    """A rank's side of tensor parallelism, as ModelRunner sees it (TensorParallelRank)."""

    def __init__(self, shards: ModelShards, group: TensorParallelGroup) -> None:
        self.shards, self.group = shards, group
        self._encoder = msgspec.msgpack.Encoder()

    def load_model(self, config: EngineConfig) -> LlamaForCausalLM:
        from kvflow.distributed.tp_layers import install_, weight_filter
        from kvflow.model.loader import load_model

        mc = config.model_config
        assert mc.hf_config is not None
        model = load_model(mc.path, mc.dtype, mc.device, mc.quantization,
                           self.shards.local_config(mc.hf_config),
                           shard=weight_filter(self.shards))
        install_(model, self.shards, mc.vocab_size, self.group)
        return model

    def agree_num_blocks(self, num_blocks: int) -> int:
        return self.group.minimum(num_blocks)

    def send_step(self, step: WorkerStep) -> None:
        self.group.broadcast_bytes(self._encoder.encode(step))


def cpu_sets(world: int) -> list[list[int]] | None:
    """Disjoint CPU sets, one per rank, or None when there are fewer CPUs than ranks.

    CPUs are ordered by (socket, core, CPU) before being cut into equal runs, so on a
    machine with two sockets and TP=2 each rank gets one socket's cores (and its memory:
    a rank touches its weights and KV cache first, from its own socket), and hyperthread
    siblings stay in one rank."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < world:
        return None

    def topology(cpu: int) -> tuple[int, int, int]:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(base + "physical_package_id") as f, open(base + "core_id") as g:
                return int(f.read()), int(g.read()), cpu
        except (OSError, ValueError):
            return 0, cpu, cpu

    ordered = sorted(cpus, key=topology)
    per = len(ordered) // world
    return [ordered[r * per:(r + 1) * per] for r in range(world)]


def pin_rank(cpus: list[int] | None, num_threads: int) -> None:
    """This process's threads: `num_threads` torch threads, on `cpus` when given."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    torch.set_num_threads(num_threads)


class MultiprocExecutor:
    """Rank 0 in this process, ranks 1..N-1 in worker processes, joined by torch.distributed."""

    def __init__(self, config: EngineConfig) -> None:
        world = config.tensor_parallel_size
        mc = config.model_config
        assert mc.hf_config is not None
        shards = ModelShards.of(mc.hf_config, 0, world)  # ValueError before any process starts
        total = config.num_threads or len(os.sched_getaffinity(0))
        threads = max(1, total // world)
        cpus = cpu_sets(world)
        self.dead: str | None = None
        # set before workers are stopped on purpose: the watcher then reports no death
        self._stopping = threading.Event()
        self.store = dist.TCPStore("127.0.0.1", 0, world, True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
        on_cpu = mc.device.type == "cpu"
        # a step's hidden states, or one sampling part's logits slices (gathered)
        capacity = max(config.scheduler_config.max_num_batched_tokens
                       * int(mc.hf_config["hidden_size"]), SAMPLE_ROWS * shards.vocab_per_rank)
        fd = create_shared_area(world, capacity) if on_cpu and _shm_wanted() else None
        self.workers = [self._start_worker(WorkerSpec(
            config, rank, world, self.store.port, fd, capacity,
            None if cpus is None else cpus[rank], threads, os.getpid()))
            for rank in range(1, world)]
        self._finalizer = weakref.finalize(self, _stop_workers, self.workers, self._stopping)
        try:
            pin_rank(None if cpus is None else cpus[0], threads)
            shm = None if fd is None else SharedMemoryAllReduce(fd, 0, world, capacity)
            self._wait_for_workers()
            self.group = TensorParallelGroup(self.store, 0, world, mc.device, shm)
            self._watcher = threading.Thread(target=self._watch, daemon=True,
                                             name="kvflow-tp-watch")
            self._watcher.start()
            self.runner = ModelRunner(config, parallel=RankContext(shards, self.group))
        except BaseException:
            self._finalizer()
            raise
        finally:
            if fd is not None:
                os.close(fd)  # the mappings keep the area alive
        logger.info("tensor parallel: %d ranks, %d threads each%s", world, threads,
                    f", CPUs {cpus}" if cpus else "")

    @staticmethod
    def _start_worker(spec: WorkerSpec) -> subprocess.Popen[bytes]:
        # a plain subprocess: the engine-core process is a daemonic multiprocessing child,
        # which may not start multiprocessing children of its own
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvflow.distributed.tp_worker"], stdin=subprocess.PIPE,
            pass_fds=() if spec.shm_fd is None else (spec.shm_fd,))
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(spec))
        proc.stdin.close()
        return proc

    def _wait_for_workers(self) -> None:
        """Until every worker has reached the group (fails fast if one exits first)."""
        keys = [f"up{rank}" for rank in range(1, len(self.workers) + 1)]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.store.check(keys):
            for rank, proc in enumerate(self.workers, start=1):
                if proc.poll() is not None:
                    raise RuntimeError(f"tensor-parallel worker {rank} exited with code "
                                       f"{proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise RuntimeError("tensor-parallel workers did not start in time")
            time.sleep(0.05)

    def _watch(self) -> None:
        """Notice a dead worker: record it, wake rank 0 out of any all-reduce, and end an
        engine-core process (a gloo collective on a dead peer may never return)."""
        while not self._stopping.is_set():
            for rank, proc in enumerate(self.workers, start=1):
                if proc.poll() is not None and not self._stopping.is_set():
                    self.dead = (f"tensor-parallel worker {rank} died (exit code "
                                 f"{proc.returncode})")
                    logger.error("%s", self.dead)
                    self.group.abort()
                    self._end_core_process()
                    return
            time.sleep(WATCH_INTERVAL_S)

    def _end_core_process(self) -> None:
        """In an engine-core process the client watches this process: give the loop a few
        seconds to report the failure itself, then exit so the client's watch fires."""
        import multiprocessing

        if multiprocessing.current_process().name != "kvflow-engine-core":
            return  # in the user's process (LLM, in-process engines): check_health raises
        time.sleep(3.0)
        _stop_workers(self.workers, self._stopping)
        os._exit(1)

    def check_health(self, wait_s: float = 0.0) -> None:
        """Raise if a worker is gone; `wait_s`: how long to give a worker whose death a
        failed collective suggests to be reaped (its sockets close as it exits)."""
        deadline = time.monotonic() + wait_s
        while self.dead is None:
            for rank, proc in enumerate(self.workers, start=1):
                if proc.poll() is not None and not self._stopping.is_set():
                    self.dead = (f"tensor-parallel worker {rank} died (exit code "
                                 f"{proc.returncode})")
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if self.dead is not None:
            raise RuntimeError(self.dead)

    def shutdown(self) -> None:
        """Tell the workers to stop, then make sure they did."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self.dead is None:
            with contextlib.suppress(Exception):
                self.runner.parallel.send_step(WorkerStep(stop=True))  # type: ignore[union-attr]
            _wait_for_exit(self.workers, 3.0)
        self._finalizer()


def _shm_wanted() -> bool:
    """KVFLOW_TP_SHM_ALL_REDUCE=0 keeps every all-reduce on gloo (to compare)."""
    return os.environ.get("KVFLOW_TP_SHM_ALL_REDUCE", "1") != "0"


def _wait_for_exit(workers: list[subprocess.Popen[bytes]], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for proc in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))


def _stop_workers(workers: list[subprocess.Popen[bytes]], stopping: threading.Event) -> None:
    """Terminate the workers still running (SIGTERM, then SIGKILL) and reap them all."""
    stopping.set()
    for proc in workers:
        if proc.poll() is None:
            proc.terminate()
    for proc in workers:
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=3)


def make_executor(config: EngineConfig) -> UniprocExecutor | MultiprocExecutor:
    if config.tensor_parallel_size == 1:
        return UniprocExecutor(config)
    return MultiprocExecutor(config)
