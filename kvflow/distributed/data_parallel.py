"""Data parallel: N engine cores, each with its own KV cache, behind one AsyncLLM client.

    AsyncLLM ─► DataParallelClient ─ Router.choose ─► replica r (MPClient or RayCoreClient)
        ▲             │ owner[request id] = r                  │ ZMQ, as for one core
        └─ get_output ◄── shared bridge ◄── (r, outputs | death) ┘

Each request runs on exactly one replica; an abort goes to its owner; the children of an
n > 1 request share one replica (their prompt prefix). Pause/resume, sleep/wake, cache
resets and LoRA add/remove/pin reach every live replica.

One replica's death: its requests' streams end with EngineDeadError naming it, live replicas
keep serving, new requests avoid the dead one, and check_health() raises (so /health says
503 and a supervisor can restart the server) until the whole engine is restarted. Only when
every replica has died is the engine dead (`dead_error`; the server then exits).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import msgspec

from kvflow.config import EngineConfig, with_device_offset
from kvflow.core.kv_cache import prompt_block_hashes
from kvflow.distributed.router import Router
from kvflow.engine.core_client import (
    CoreClient,
    MPClient,
    OutputBridge,
    RequestsFailed,
    RequestType,
    _core_environment,
)
from kvflow.engine.protocol import EngineCoreOutputs, EngineCoreRequest, SchedulerStats
from kvflow.errors import EngineDeadError

logger = logging.getLogger(__name__)

ReplicaItem = tuple[int, EngineCoreOutputs | BaseException]


class ReplicaSink:
    """Tags what one replica's client receives with the replica's index (a death too: it
    travels as a value, so it ends that replica's requests, not the shared stream)."""

    def __init__(self, shared: OutputBridge[ReplicaItem], index: int) -> None:
        self.shared = shared
        self.index = index

    def push(self, item: EngineCoreOutputs | BaseException) -> None:
        self.shared.push((self.index, item))


class DataParallelClient(CoreClient):
    """Routes each request to one of N engine-core replicas and merges their outputs."""

    def __init__(self, replicas: list[CoreClient], shared: OutputBridge[ReplicaItem],
                 router: Router, block_size: int) -> None:
        """`replicas` deliver into `shared` through ReplicaSinks (see `start`)."""
        super().__init__()
        self.replicas = replicas
        self.shared = shared
        self.router = router
        self.block_size = block_size
        self.owner: dict[str, int] = {}  # request id -> its replica
        self.family_of: dict[str, str] = {}  # request id -> affinity (n > 1 parent id)
        self.families: dict[str, tuple[int, int]] = {}  # affinity -> (replica, in flight)
        # each replica's latest stats (zeros until its first report; None once it died)
        self.latest_stats: list[SchedulerStats | None] = [SchedulerStats() for _ in replicas]
        self._lora_keys: dict[tuple[int, str], str | None] = {}
        self._ended: set[int] = set()  # replicas whose death has been handled
        self.num_kv_blocks = min(r.num_kv_blocks for r in replicas)  # a request fits one
        self.max_concurrency = sum(r.max_concurrency for r in replicas)

    @classmethod
    def start(cls, config: EngineConfig) -> DataParallelClient:
        """Start the replicas (processes here, or Ray actors) and connect to them."""
        dp = config.data_parallel_config
        assert dp is not None
        shared: OutputBridge[ReplicaItem] = OutputBridge()
        sinks = [ReplicaSink(shared, i) for i in range(dp.size)]
        if dp.backend == "ray":
            from kvflow.distributed.ray_backend import start_ray_replicas

            replicas: list[CoreClient] = list(start_ray_replicas(config, sinks))
        else:
            replicas = start_mp_replicas(config, sinks)
        logger.info("%d data-parallel replicas (%s), routing: %s", dp.size, dp.backend,
                    dp.routing)
        return cls(replicas, shared, Router(dp.size, dp.routing), config.cache_config.block_size)

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest, affinity: str | None = None) -> None:
        self.check_alive()
        self._notice_deaths()
        replica = self._family_replica(affinity)
        if replica is None:
            replica = self.router.choose(self._block_hashes(request))
        self.owner[request.request_id] = replica
        self.router.started(replica)
        if affinity is not None:
            _, members = self.families.get(affinity, (replica, 0))
            self.families[affinity] = (replica, members + 1)
            self.family_of[request.request_id] = affinity
        try:
            self.replicas[replica].add_request(request)
        except BaseException:
            self._release(request.request_id)
            raise

    def _family_replica(self, affinity: str | None) -> int | None:
        family = self.families.get(affinity) if affinity is not None else None
        if family is None or not self.router.alive[family[0]]:
            return None
        return family[0]

    def _block_hashes(self, request: EngineCoreRequest) -> list[int]:
        """The request's block hashes as its replica will compute them (prefix-aware only)."""
        if not self.router.prefix_aware:
            return []
        lora_key = None
        lora = request.lora_request
        if lora is not None:
            key = (lora.lora_int_id, lora.lora_path)
            if key not in self._lora_keys:
                from kvflow.lora.adapter import folder_digest

                self._lora_keys[key] = folder_digest(lora.lora_path)
            lora_key = self._lora_keys[key]
        return prompt_block_hashes(request.prompt_token_ids, self.block_size, lora_key,
                                   request.sampling_params.cache_salt, request.mm_features or ())

    def abort_requests(self, request_ids: list[str]) -> None:
        by_replica: dict[int, list[str]] = {}
        for request_id in request_ids:
            replica = self._release(request_id)
            if replica is not None:
                by_replica.setdefault(replica, []).append(request_id)
        for replica, ids in by_replica.items():
            self.replicas[replica].abort_requests(ids)

    def _release(self, request_id: str) -> int | None:
        """Forget a request that finished or was aborted; its replica, if it had one."""
        replica = self.owner.pop(request_id, None)
        if replica is None:
            return None
        self.router.finished(replica)
        affinity = self.family_of.pop(request_id, None)
        if affinity is not None:
            family_replica, members = self.families[affinity]
            if members > 1:
                self.families[affinity] = (family_replica, members - 1)
            else:
                del self.families[affinity]
        return replica

    # ---- outputs -------------------------------------------------------------------------
    async def get_output(self) -> EngineCoreOutputs:
        while True:
            replica, item = await self.shared.get()
            if isinstance(item, BaseException):
                self._replica_died(replica, item)  # raises
            outputs = item
            if outputs.kv_events is not None:
                self.router.apply_events(replica, outputs.kv_events)
            for out in outputs.outputs:
                if out.finish_reason is not None:
                    self._release(out.request_id)
            if outputs.scheduler_stats is not None:
                self.latest_stats[replica] = outputs.scheduler_stats
                outputs.scheduler_stats = sum_stats(self.latest_stats)
            if outputs.outputs or outputs.scheduler_stats is not None:
                return outputs

    def _replica_died(self, replica: int, error: BaseException) -> NoReturn:
        """End the dead replica's requests; the engine is dead only when all replicas are."""
        if replica in self._ended:
            raise RequestsFailed([], EngineDeadError(str(error)))
        self._ended.add(replica)
        self.router.mark_dead(replica)
        self.latest_stats[replica] = None
        ids = [rid for rid, r in self.owner.items() if r == replica]
        for request_id in ids:
            self._release(request_id)
        dead = EngineDeadError(f"data-parallel replica {replica} died: {error}")
        logger.error("%s; %d of its requests end", dead, len(ids))
        if not any(self.router.alive):
            self.dead_error = EngineDeadError(f"every data-parallel replica died (last: "
                                              f"replica {replica}: {error})")
            self.shared.push(self.dead_error)  # stays: every later get() raises it
            raise self.dead_error
        raise RequestsFailed(ids, dead)

    def _notice_deaths(self) -> None:
        """A replica whose client saw it die takes no new request, even before its death
        notice went through the shared stream."""
        for i, replica in enumerate(self.replicas):
            if replica.dead_error is not None and self.router.alive[i]:
                self.router.alive[i] = False

    def engine_stats(self) -> list[SchedulerStats | None]:
        return list(self.latest_stats)

    def routed_counts(self) -> list[int]:
        return list(self.router.routed)

    # ---- utility calls: every live replica -------------------------------------------------
    async def call_each(self, method: str, *args: Any) -> list[Any]:
        """Call every live replica at once; None for a dead one. A replica's ValueError (a
        refused adapter, say) is raised."""
        self._notice_deaths()

        async def one(i: int) -> Any:
            if not self.router.alive[i]:
                return None
            try:
                return await self.replicas[i].call_utility(method, *args)
            except EngineDeadError:
                return None

        return list(await asyncio.gather(*(one(i) for i in range(len(self.replicas)))))

    async def call_utility(self, method: str, *args: Any) -> Any:
        self.check_alive()
        results = [r for r in await self.call_each(method, *args) if r is not None]
        if method == "get_stats":
            return msgspec.to_builtins(sum_stats(
                [msgspec.convert(r, SchedulerStats) for r in results]))
        if method == "num_unfinished_requests":
            return sum(results)
        if method == "list_loras":
            return sorted(set().union(*(set(r) for r in results)))
        if method in ("is_sleeping", "remove_lora"):
            return any(results)
        return all(results) if results else None

    # ---- health and shutdown --------------------------------------------------------------
    def check_health(self) -> None:
        self.check_alive()
        self._notice_deaths()
        dead = [i for i, alive in enumerate(self.router.alive) if not alive]
        if dead:
            raise EngineDeadError(f"data-parallel replica(s) {dead} of {len(self.replicas)} "
                                  "died; the others still serve")

    def _send(self, kind: RequestType, payload: Any) -> None:
        raise NotImplementedError("a replica set sends through its replicas")

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        with ThreadPoolExecutor(max_workers=len(self.replicas)) as pool:
            list(pool.map(lambda r: r.shutdown(), self.replicas))


def sum_stats(per_replica: list[SchedulerStats | None]) -> SchedulerStats:
    """The replicas' stats added up (KV usage: the mean, weighted by each replica's blocks;
    slots: the largest)."""
    total = SchedulerStats()
    live = [s for s in per_replica if s is not None]
    for field in SchedulerStats.__struct_fields__:
        values = [getattr(s, field) for s in live]
        if field in ("kv_cache_usage", "max_lora") or not values:
            continue
        if isinstance(values[0], dict):
            merged: dict[str, int] = {}
            for v in values:
                for k, n in v.items():
                    merged[k] = merged.get(k, 0) + n
            setattr(total, field, merged)
        elif isinstance(values[0], list):  # per position (speculative decoding)
            width = max(len(v) for v in values)
            setattr(total, field, [sum(v[i] for v in values if i < len(v))
                                   for i in range(width)])
        else:
            setattr(total, field, sum(values))
    blocks = sum(s.num_kv_blocks for s in live)
    total.kv_cache_usage = (sum(s.kv_cache_usage * s.num_kv_blocks for s in live) / blocks
                            if blocks else 0.0)
    total.max_lora = max((s.max_lora for s in live), default=0)
    return total


def replica_threads(config: EngineConfig, replicas: int) -> int:
    """Torch threads of each local replica: the user's number, else this machine's cores
    shared out (replicas on one machine must not oversubscribe it)."""
    if config.num_threads is not None:
        return config.num_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // replicas)


def replica_config(config: EngineConfig, index: int, replicas: int) -> EngineConfig:
    """Local replica `index`'s config: its share of the cores, and on GPUs its own ones
    (replica i's ranks on GPUs i*tp .. i*tp+tp-1)."""
    return dataclasses.replace(with_device_offset(config, index * config.tensor_parallel_size),
                               num_threads=replica_threads(config, replicas))


def start_mp_replicas(config: EngineConfig, sinks: list[ReplicaSink]) -> list[CoreClient]:
    """One engine-core process per replica, started (and loading the model) at once."""
    configs = [replica_config(config, i, len(sinks)) for i in range(len(sinks))]
    with _core_environment(), ThreadPoolExecutor(max_workers=len(sinks)) as pool:
        futures = [pool.submit(MPClient, c, sink) for c, sink in zip(configs, sinks, strict=True)]
        started: list[CoreClient] = []
        error: BaseException | None = None
        for fut in futures:
            try:
                started.append(fut.result())
            except BaseException as exc:  # every replica is awaited, then all are stopped
                error = error or exc
    if error is not None:
        for client in started:
            client.shutdown()
        raise error
    return started
