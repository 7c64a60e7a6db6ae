"""data_parallel_size=2: the replica set's bookkeeping with fake replicas, then two engine
processes: concurrent streams, aborts, n > 1, conversations sticking, utilities, a death."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kvflow import EngineDeadError
from kvflow.config import AsyncEngineArgs, EngineArgs, offset_device
from kvflow.distributed.data_parallel import (
    DataParallelClient,
    ReplicaSink,
    replica_config,
    replica_threads,
    sum_stats,
)
from kvflow.distributed.router import Router
from kvflow.engine.async_llm import AsyncLLM
from kvflow.engine.core_client import CoreClient, OutputBridge, RequestsFailed
from kvflow.engine.protocol import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    FinishReason,
    KVCacheEvents,
    SchedulerStats,
)
from kvflow.engine.stats import format_engines
from kvflow.sampling_params import SamplingParams
from tests.distributed.dp_helpers import (
    assert_dp_clean,
    dp_client,
    params,
    prompt_ids,
    record_routes,
    run,
    tokens_or_death,
)

CPU = torch.device("cpu")


# ---- the replica set without processes -------------------------------------------------
class FakeReplica(CoreClient):
    """Records what reaches it; answers utility calls from `answers`."""

    def __init__(self, sink: ReplicaSink) -> None:
        super().__init__(sink)
        self.num_kv_blocks, self.max_concurrency = 100, 2.0
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.answers: dict[str, Any] = {}

    def add_request(self, request: EngineCoreRequest, affinity: str | None = None) -> None:
        self.check_alive()
        self.added.append(request.request_id)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.aborted.extend(request_ids)

    async def call_utility(self, method: str, *args: Any) -> Any:
        self.check_alive()
        answer = self.answers.get(method, True)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def shutdown(self) -> None:
        self._closing = True


def fake_set(n: int = 2) -> tuple[DataParallelClient, list[FakeReplica]]:
    shared: OutputBridge[Any] = OutputBridge()
    replicas = [FakeReplica(ReplicaSink(shared, i)) for i in range(n)]
    return DataParallelClient(list(replicas), shared, Router(n), 16), replicas


def request(request_id: str, length: int = 40) -> EngineCoreRequest:
    return EngineCoreRequest(request_id, prompt_ids(hash(request_id) % 1000, length),
                             SamplingParams(max_tokens=4), [2], 0.0)


def finished(request_id: str) -> EngineCoreOutputs:
    return EngineCoreOutputs([EngineCoreOutput(request_id, [5], finish_reason=FinishReason.STOP)])


async def test_each_request_goes_to_one_replica_and_aborts_to_its_owner() -> None:
    dp, replicas = fake_set()
    for i in range(6):
        dp.add_request(request(f"r{i}"))
    assert sorted(replicas[0].added + replicas[1].added) == [f"r{i}" for i in range(6)]
    assert len(replicas[0].added) == len(replicas[1].added) == 3  # no prefix: spread
    dp.abort_requests(["r0", "r1", "unknown"])
    assert sorted(replicas[0].aborted + replicas[1].aborted) == ["r0", "r1"]
    assert not set(replicas[0].aborted) - set(replicas[0].added)
    replicas[dp.owner["r2"]].sink.push(finished("r2"))
    out = await dp.get_output()
    assert out.outputs[0].request_id == "r2" and "r2" not in dp.owner
    dp.abort_requests([f"r{i}" for i in range(3, 6)])
    assert not dp.owner and dp.router.load == [0, 0]


async def test_n_children_share_a_replica_and_events_feed_the_index() -> None:
    dp, replicas = fake_set()
    dp.add_request(request("busy"))  # replica 0 busier: a free choice would pick 1
    for i in range(3):
        dp.add_request(request(f"{i}_parent"), affinity="parent")
    assert {dp.owner[f"{i}_parent"] for i in range(3)} == {1}
    dp.abort_requests([f"{i}_parent" for i in range(3)] + ["busy"])
    assert not dp.families
    replicas[1].sink.push(EngineCoreOutputs(kv_events=KVCacheEvents(stored=[1, 2, 3])))
    replicas[1].sink.push(finished("late"))  # an output after the events
    await dp.get_output()
    assert dp.router.indexes[1].hashes == {1, 2, 3}


async def test_utilities_reach_every_replica_and_combine() -> None:
    dp, replicas = fake_set()
    replicas[0].answers["get_stats"] = {"num_running_reqs": 2, "num_kv_blocks": 100,
                                        "kv_cache_usage": 0.5, "prefix_cache_hits": 3}
    replicas[1].answers["get_stats"] = {"num_running_reqs": 1, "num_kv_blocks": 100,
                                        "kv_cache_usage": 0.1, "prefix_cache_hits": 4}
    stats = await dp.call_utility("get_stats")
    assert stats["num_running_reqs"] == 3 and stats["prefix_cache_hits"] == 7
    assert abs(stats["kv_cache_usage"] - 0.3) < 1e-9
    replicas[0].answers["list_loras"], replicas[1].answers["list_loras"] = [1], [2]
    assert await dp.call_utility("list_loras") == [1, 2]
    replicas[1].answers["reset_prefix_cache"] = False
    assert await dp.call_utility("reset_prefix_cache") is False
    replicas[0].answers["is_sleeping"], replicas[1].answers["is_sleeping"] = False, True
    assert await dp.call_utility("is_sleeping") is True
    replicas[1].answers["add_lora"] = ValueError("bad adapter")
    with pytest.raises(ValueError, match="bad adapter"):
        await dp.call_utility("add_lora", None)


async def test_one_death_ends_only_its_requests() -> None:
    dp, replicas = fake_set()
    for i in range(4):
        dp.add_request(request(f"r{i}"))
    on_zero = sorted(replicas[0].added)
    replicas[0]._mark_dead("process gone")
    with pytest.raises(RequestsFailed) as failed:
        await dp.get_output()
    assert sorted(failed.value.request_ids) == on_zero
    assert "replica 0" in str(failed.value.error)
    dp.check_alive()  # the engine still serves
    assert dp.engine_stats()[0] is None and dp.engine_stats()[1] == SchedulerStats()
    with pytest.raises(EngineDeadError, match=r"replica\(s\) \[0\]"):
        dp.check_health()
    dp.add_request(request("after"))
    assert dp.owner["after"] == 1 and dp.router.load[0] == 0
    assert await dp.call_each("num_unfinished_requests") == [None, True]
    replicas[1]._mark_dead("also gone")
    with pytest.raises(EngineDeadError, match="every data-parallel replica"):
        await dp.get_output()
    with pytest.raises(EngineDeadError):
        dp.add_request(request("never"))


def test_stats_add_up_and_log_per_engine() -> None:
    a = SchedulerStats(num_running_reqs=1, num_kv_blocks=10, kv_cache_usage=1.0,
                       prefix_cache_queries=10, prefix_cache_hits=5,
                       running_lora_adapters={"x": 1}, spec_num_accepted_tokens_per_pos=[4, 2])
    b = SchedulerStats(num_running_reqs=2, num_kv_blocks=30, running_lora_adapters={"x": 2},
                       spec_num_accepted_tokens_per_pos=[3, 1, 1])
    total = sum_stats([a, b, None])
    assert total.num_running_reqs == 3 and total.kv_cache_usage == 0.25
    assert total.running_lora_adapters == {"x": 3}
    assert total.spec_num_accepted_tokens_per_pos == [7, 3, 1]
    line = format_engines([a, None])
    assert "engine 0: 1 running" in line and "hits 50.0%" in line and "engine 1: dead" in line


def test_data_parallel_arguments_are_checked() -> None:
    for bad in ({"data_parallel_size": 0}, {"data_parallel_backend": "slurm"},
                {"data_parallel_routing": "random"}):
        with pytest.raises(ValueError, match="data_parallel"):
            EngineArgs(**bad)._data_parallel_config(CPU)  # type: ignore[arg-type]
    assert EngineArgs()._data_parallel_config(CPU) is None


def test_local_replicas_on_gpus_need_a_gpu_per_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    args = EngineArgs(data_parallel_size=2, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="needs 4 GPUs on this machine; torch sees 3"):
        args._data_parallel_config(torch.device("cuda"))
    assert args._data_parallel_config(CPU) is not None  # cores are shared out instead
    ray = EngineArgs(data_parallel_size=2, tensor_parallel_size=2, data_parallel_backend="ray")
    assert ray._data_parallel_config(torch.device("cuda")) is not None  # Ray places GPUs


def test_each_local_replica_gets_its_own_gpus_and_share_of_cores(tiny_llama_path: Path) -> None:
    config = EngineArgs(model=str(tiny_llama_path), num_kv_blocks=16).create_engine_config()
    on_cpu = [replica_config(config, i, 2) for i in range(2)]
    assert [c.model_config.device for c in on_cpu] == [CPU, CPU]
    assert on_cpu[0].num_threads == on_cpu[1].num_threads == replica_threads(config, 2)
    gpu = dataclasses.replace(config, tensor_parallel_size=2, model_config=dataclasses.replace(
        config.model_config, device=torch.device("cuda")))
    devices = [replica_config(gpu, i, 3).model_config.device for i in range(3)]
    assert devices == [torch.device("cuda", 0), torch.device("cuda", 2), torch.device("cuda", 4)]
    # a rank's GPU follows its replica's first one
    assert offset_device(devices[1], 1) == torch.device("cuda", 3)
    assert offset_device(CPU, 1) == CPU


# ---- two engine-core processes -------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_llama_path: Path):
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(tiny_llama_path), kv_cache_memory_gb=0.05, max_num_seqs=64,
        data_parallel_size=2, disable_log_stats=True, enable_lora=True,
        enable_sleep_mode=True))
    yield llm
    llm.shutdown()


async def test_concurrent_streams_each_run_once_and_spread(engine: AsyncLLM) -> None:
    before = await engine.get_engine_stats()
    routes = record_routes(engine)
    prompts = {f"u{i}": prompt_ids(i, 20 + i) for i in range(30)}
    results = await asyncio.gather(*(run(engine, rid, ids, params(6))
                                     for rid, ids in prompts.items()))
    assert all(len(tokens) == 6 for tokens in results)
    counts = [list(routes.values()).count(r) for r in (0, 1)]
    assert min(counts) >= 10, counts  # uniform traffic: a fair share each
    after = await engine.get_engine_stats()
    # each prompt was looked up (admitted) on exactly one replica: the lookups add up
    looked_up = [a.prefix_cache_queries - b.prefix_cache_queries  # type: ignore[union-attr]
                 for a, b in zip(after, before, strict=True)]
    for replica in (0, 1):
        assert looked_up[replica] == sum(len(prompts[rid]) for rid, r in routes.items()
                                         if r == replica)
    await assert_dp_clean(engine)


async def test_aborts_and_cancels_reach_the_owner(engine: AsyncLLM) -> None:
    seen = {i: asyncio.Event() for i in range(8)}

    async def consume(i: int) -> list[Any]:
        outs = []
        sp = params(400 if i < 4 else 10)
        async for out in engine.generate({"prompt_token_ids": prompt_ids(100 + i, 24)}, sp,
                                         f"a{i}"):
            outs.append(out)
            seen[i].set()
        return outs

    tasks = [asyncio.create_task(consume(i)) for i in range(8)]
    await asyncio.gather(*(seen[i].wait() for i in range(4)))
    await engine.abort(["a0", "a1"])
    tasks[2].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for outs in results[:2]:
        assert isinstance(outs, list) and outs[-1].outputs[0].finish_reason == "abort"
    assert isinstance(results[2], asyncio.CancelledError)
    for outs in results[4:]:
        assert isinstance(outs, list) and sum(len(o.outputs[0].token_ids) for o in outs) == 10
    await engine.abort("a3")
    await assert_dp_clean(engine)


async def test_n_children_run_on_one_replica(engine: AsyncLLM) -> None:
    routes = record_routes(engine)
    finals = []
    async for out in engine.generate({"prompt_token_ids": prompt_ids(7, 40)},
                                     params(5, n=3), "fam"):
        finals.extend(c.index for c in out.outputs if c.finish_reason)
    assert sorted(finals) == [0, 1, 2]
    assert len({routes[f"{i}_fam"] for i in range(3)}) == 1
    await assert_dp_clean(engine)


async def test_conversation_turns_stick_to_one_replica(engine: AsyncLLM) -> None:
    routes = record_routes(engine)
    histories = {c: prompt_ids(500 + c, 50) for c in range(4)}
    before = await engine.get_scheduler_stats()
    for turn in range(4):
        replies = await asyncio.gather(*(run(engine, f"c{c}-t{turn}", histories[c], params(6))
                                         for c in histories))
        for c, reply in zip(histories, replies, strict=True):
            histories[c] = histories[c] + reply + prompt_ids(900 + c + turn, 10)
    for c in histories:
        assert len({routes[f"c{c}-t{t}"] for t in range(4)}) == 1, routes
    assert {routes[f"c{c}-t0"] for c in histories} == {0, 1}  # and they spread
    after = await engine.get_scheduler_stats()
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    assert hits / queries > 0.5  # turns 2-4 find their whole history
    await assert_dp_clean(engine)


async def test_utilities_reach_both_replicas(engine: AsyncLLM) -> None:
    client = dp_client(engine)
    assert len(await run(engine, "before-reset", prompt_ids(4141, 40), params(2))) == 2
    cached_before = set().union(*(index.hashes for index in client.router.indexes))
    assert cached_before
    await engine.pause_generation(mode="keep")
    assert await engine.is_paused()
    await engine.resume_generation()
    assert await engine.reset_prefix_cache()
    # the replicas' "cleared" events come with their answers; this loop's output handler
    # (started by a request) applies them
    assert len(await run(engine, "after-reset", prompt_ids(4242, 40), params(2))) == 2
    cached_now = set().union(*(index.hashes for index in client.router.indexes))
    assert cached_now and not cached_now & cached_before
    stats = await engine.get_engine_stats()
    assert len(stats) == 2 and all(s is not None for s in stats)
    assert not await engine.is_sleeping()
    await engine.check_health()
    await assert_dp_clean(engine)


async def test_sleep_and_wake_reach_both_replicas(engine: AsyncLLM) -> None:
    await engine.sleep(1)
    assert await engine.engine_core.call_each("is_sleeping") == [True, True]
    waiting = asyncio.create_task(run(engine, "slept", prompt_ids(11, 20), params(3)))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # held in the client while the replicas sleep
    await engine.wake_up()
    assert await engine.engine_core.call_each("is_sleeping") == [False, False]
    assert len(await asyncio.wait_for(waiting, timeout=60)) == 3
    await assert_dp_clean(engine)


async def test_lora_reaches_both_replicas_and_keys_routing_as_the_core(
        engine: AsyncLLM, tiny_llama_path: Path, tmp_path: Path) -> None:
    from kvflow.lora.request import LoRARequest
    from tests.lora.adapters import make_adapter

    folder = make_adapter(tiny_llama_path, tmp_path / "qv4", 4, ("q_proj", "v_proj"), seed=1)
    lora = LoRARequest("qv4", 7, str(folder))
    assert await engine.add_lora(lora)
    assert await engine.engine_core.call_each("list_loras") == [[7], [7]]
    assert await engine.pin_lora(7)
    routes = record_routes(engine)
    ids = prompt_ids(31337, 50)
    tokens = []
    async for out in engine.generate({"prompt_token_ids": ids}, params(4), "lora-turn",
                                     lora_request=lora):
        tokens.extend(out.outputs[0].token_ids)
    assert len(tokens) == 4
    client = dp_client(engine)
    request = EngineCoreRequest("probe", ids, SamplingParams(max_tokens=1), [2], 0.0,
                                lora_request=lora)
    hashes = client._block_hashes(request)
    assert len(hashes) == 3  # the client keys the blocks with the adapter's digest, as
    assert client.router.indexes[routes["lora-turn"]].match(hashes) == 3  # the core did
    plain = client._block_hashes(EngineCoreRequest("p", ids, SamplingParams(), [2], 0.0))
    assert client.router.indexes[routes["lora-turn"]].match(plain) == 0
    assert await engine.remove_lora(7)
    assert await engine.list_loras() == set()
    await assert_dp_clean(engine)


async def test_killing_one_replica_ends_its_streams_only(engine: AsyncLLM) -> None:
    """(Last in this module: it kills one of the shared engine's replicas.)"""
    client = dp_client(engine)
    routes = record_routes(engine)
    started = asyncio.Event()

    tasks = [asyncio.create_task(tokens_or_death(engine, f"k{i}", prompt_ids(300 + i, 20),
                                                 params(60 if i % 2 else 2000), started))
             for i in range(8)]
    await started.wait()
    victim = routes["k0"]
    os.kill(client.replicas[victim].proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    t0 = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    for i, result in enumerate(results):
        if routes[f"k{i}"] == victim:
            assert isinstance(result, EngineDeadError) and f"replica {victim}" in str(result)
        else:
            assert result == (60 if i % 2 else 2000)
    assert time.monotonic() - t0 < 30
    with pytest.raises(EngineDeadError, match=rf"replica\(s\) \[{victim}\]"):
        await engine.check_health()
    assert not engine.errored  # the other replica still serves, new requests avoid the dead
    assert len(await run(engine, "after", prompt_ids(999, 20), params(4))) == 4
    assert routes["after"] != victim
    assert (await engine.get_engine_stats())[victim] is None
    await assert_dp_clean(engine)


@pytest.mark.slow
def test_kvflow_serve_with_two_replicas(tiny_llama_path: Path) -> None:
    """`kvflow serve --data-parallel-size 2`: answers, and /metrics has per-engine series."""
    import httpx

    from tests.entrypoints.conftest import RemoteServer

    with RemoteServer([str(tiny_llama_path), "--data-parallel-size", "2",
                       "--data-parallel-routing", "round_robin", "--kv-cache-memory-gb",
                       "0.05", "--disable-log-stats"]) as server:
        client = server.client()
        for i in range(4):
            reply = client.completions.create(model=str(tiny_llama_path), prompt=f"Hi {i}",
                                              max_tokens=3)
            assert reply.choices[0].text is not None
        text = httpx.get(server.url("/metrics")).text
        for engine in ("0", "1"):
            assert (f'kvflow:engine_requests_routed_total{{engine="{engine}",'
                    f'model_name="{tiny_llama_path}"}} 2.0') in text
            assert f'kvflow:engine_alive{{engine="{engine}"' in text
        assert httpx.get(server.url("/health")).status_code == 200


def test_the_synchronous_llm_refuses_replicas(tiny_llama_path: Path) -> None:
    from kvflow import LLM

    with pytest.raises(ValueError, match="needs AsyncLLM"):
        LLM(str(tiny_llama_path), data_parallel_size=2, kv_cache_memory_gb=0.05)
