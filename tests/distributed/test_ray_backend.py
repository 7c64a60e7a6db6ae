"""data_parallel_size=2 on a local Ray cluster: engine cores as actors over TCP ZMQ.

Few tests on one engine (starting Ray and two actors takes tens of seconds here)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from kvflow import EngineDeadError
from kvflow.config import AsyncEngineArgs
from kvflow.distributed.ray_backend import RayCoreClient
from kvflow.engine.async_llm import AsyncLLM
from tests.distributed.dp_helpers import (
    assert_dp_clean,
    dp_client,
    params,
    prompt_ids,
    record_routes,
    run,
    tokens_or_death,
)

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tiny_llama_path: Path):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(tiny_llama_path), kv_cache_memory_gb=0.05, data_parallel_size=2,
            data_parallel_backend="ray", disable_log_stats=True))
        yield llm
        llm.shutdown()
        assert not ray.util.list_named_actors()  # (ours are unnamed; none leaked by name)
    finally:
        ray.shutdown()


async def test_streams_aborts_and_n_on_ray_replicas(engine: AsyncLLM) -> None:
    client = dp_client(engine)
    assert all(isinstance(r, RayCoreClient) for r in client.replicas)
    routes = record_routes(engine)
    seen = asyncio.Event()

    async def long(i: int) -> list[Any]:
        outs = []
        async for out in engine.generate({"prompt_token_ids": prompt_ids(50 + i, 24)},
                                         params(500), f"long{i}"):
            outs.append(out)
            seen.set()
        return outs

    longs = [asyncio.create_task(long(i)) for i in range(2)]
    shorts = [run(engine, f"s{i}", prompt_ids(i, 20 + i), params(6)) for i in range(16)]
    family = run(engine, "fam", prompt_ids(77, 30), params(5, n=3))
    await seen.wait()
    await engine.abort(["long0", "long1"])
    results = await asyncio.gather(*shorts, family, *longs)
    assert all(len(tokens) == 6 for tokens in results[:16])
    assert len(results[16]) == 15  # three children of five tokens
    assert len({routes[f"{i}_fam"] for i in range(3)}) == 1
    for outs in results[17:]:
        assert outs[-1].outputs[0].finish_reason == "abort"
    counts = [list(routes.values()).count(r) for r in (0, 1)]
    assert min(counts) >= 6, counts
    await assert_dp_clean(engine)


async def test_conversations_stick_on_ray_replicas(engine: AsyncLLM) -> None:
    routes = record_routes(engine)
    histories = {c: prompt_ids(600 + c, 40) for c in range(4)}
    for turn in range(3):
        replies = await asyncio.gather(*(run(engine, f"c{c}-t{turn}", histories[c], params(4))
                                         for c in histories))
        for c, reply in zip(histories, replies, strict=True):
            histories[c] = histories[c] + reply + prompt_ids(700 + c + turn, 8)
    for c in histories:
        assert len({routes[f"c{c}-t{t}"] for t in range(3)}) == 1, routes
    await assert_dp_clean(engine)


async def test_a_dead_actor_ends_its_streams(engine: AsyncLLM) -> None:
    """(Last: it kills one of the module engine's actors.)"""
    client = dp_client(engine)
    routes = record_routes(engine)
    started = asyncio.Event()

    tasks = [asyncio.create_task(tokens_or_death(engine, f"k{i}", prompt_ids(90 + i, 20),
                                                 params(3000), started))
             for i in range(4)]
    await started.wait()
    victim = routes["k0"]
    actor = client.replicas[victim].actor  # type: ignore[attr-defined]
    os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)
    t0 = time.monotonic()
    done, _ = await asyncio.wait(
        [tasks[i] for i in range(4) if routes[f"k{i}"] == victim], timeout=30)
    assert time.monotonic() - t0 < 30
    assert done and all(isinstance(t.result(), EngineDeadError) for t in done)
    with pytest.raises(EngineDeadError, match=rf"replica\(s\) \[{victim}\]"):
        await engine.check_health()
    assert not engine.errored
    await engine.abort([f"k{i}" for i in range(4)])  # the live replica's long streams
    await asyncio.gather(*tasks)
    assert len(await run(engine, "after", prompt_ids(5, 20), params(3))) == 3
    await assert_dp_clean(engine)
