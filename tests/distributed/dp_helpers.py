"""Shared checks of the data-parallel tests (processes and Ray)."""

from __future__ import annotations

import asyncio
import time

from kvflow import RequestOutputKind, SamplingParams
from kvflow.distributed.data_parallel import DataParallelClient
from kvflow.engine.async_llm import AsyncLLM
from kvflow.errors import EngineDeadError


def params(max_tokens: int = 8, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                          output_kind=RequestOutputKind.DELTA, **kw)  # type: ignore[arg-type]


def dp_client(engine: AsyncLLM) -> DataParallelClient:
    client = engine.engine_core
    assert isinstance(client, DataParallelClient)
    return client


def prompt_ids(seed: int, length: int) -> list[int]:
    """Distinct token prompts (ids well inside the tiny models' vocabulary)."""
    return [(seed * 7919 + i * 104729) % 40000 + 100 for i in range(length)]


async def run(engine: AsyncLLM, request_id: str, ids: list[int], sp: SamplingParams
              ) -> list[int]:
    """Every token the request produced (all n completions)."""
    tokens: list[int] = []
    async for out in engine.generate({"prompt_token_ids": ids}, sp, request_id):
        for completion in out.outputs:
            tokens.extend(completion.token_ids)
    return tokens


async def tokens_or_death(engine: AsyncLLM, request_id: str, ids: list[int],
                          sp: SamplingParams, started: asyncio.Event) -> BaseException | int:
    """How many tokens the request streamed, or the EngineDeadError that ended it;
    `started` is set at its first output."""
    count = 0
    try:
        async for out in engine.generate({"prompt_token_ids": ids}, sp, request_id):
            count += len(out.outputs[0].token_ids)
            started.set()
    except EngineDeadError as exc:
        return exc
    return count


def record_routes(engine: AsyncLLM) -> dict[str, int]:
    """Request id -> the replica it was sent to, for every request from now on."""
    client = dp_client(engine)
    routes: dict[str, int] = {}
    real_add = client.add_request

    def add(request, affinity=None):  # type: ignore[no-untyped-def]
        real_add(request, affinity)
        routes[request.request_id] = client.owner[request.request_id]

    client.add_request = add  # type: ignore[method-assign]
    return routes


async def assert_dp_clean(engine: AsyncLLM, timeout: float = 5.0) -> None:
    """No request state in the client, the router or any live replica; no KV block held."""
    client = dp_client(engine)
    deadline = time.monotonic() + timeout
    while True:
        stats = await engine.get_engine_stats()
        live = [s for s in stats if s is not None]
        core_left = await engine.get_num_unfinished_requests_in_core()
        clean = (core_left == 0 and not engine.has_unfinished_requests()
                 and not client.owner and not client.families and not any(client.router.load)
                 and all(s.num_running_reqs == 0 and s.num_waiting_reqs == 0
                         and s.kv_cache_usage == 0.0 for s in live))
        if clean:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not clean: {stats}, core {core_left}, owner {client.owner}, "
                                 f"load {client.router.load}")
        await asyncio.sleep(0.05)
