"""AsyncLLM with the core in its own process: streaming, aborts, pause, death, health."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from kvflow import LLM, EngineDeadError, RequestOutputKind, SamplingParams
from kvflow.config import AsyncEngineArgs
from kvflow.engine.async_llm import AsyncLLM


def params(max_tokens: int = 10, kind: RequestOutputKind = RequestOutputKind.DELTA,
           **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, output_kind=kind,
                          temperature=0.0, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine(tiny_llama_path: Path):
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(tiny_llama_path), kv_cache_memory_gb=0.05, max_num_seqs=128,
        disable_log_stats=True))
    yield llm
    llm.shutdown()


async def assert_engine_clean(engine: AsyncLLM, timeout: float = 2.0) -> None:
    """Client and core hold no request; no KV block is held by a request."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await engine.get_scheduler_stats()
        core_left = await engine.get_num_unfinished_requests_in_core()
        clean = (core_left == 0 and stats.num_running_reqs == 0 and stats.num_waiting_reqs == 0
                 and stats.kv_cache_usage == 0.0 and not engine.has_unfinished_requests())
        if clean:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not clean: {stats}, core requests {core_left}")
        await asyncio.sleep(0.05)


async def collect(engine: AsyncLLM, request_id: str, sp: SamplingParams, prompt: str = "Hello"):
    return [out async for out in engine.generate(prompt, sp, request_id)]


async def test_100_concurrent_delta_and_final_only(engine: AsyncLLM) -> None:
    deltas = await asyncio.gather(*(collect(engine, f"d{i}", params()) for i in range(100)))
    for outs in deltas:
        assert sum(len(o.outputs[0].token_ids) for o in outs) == 10
        assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
    finals = await asyncio.gather(*(
        collect(engine, f"f{i}", params(kind=RequestOutputKind.FINAL_ONLY)) for i in range(100)))
    for outs in finals:
        assert len(outs) == 1 and len(outs[0].outputs[0].token_ids) == 10
    await assert_engine_clean(engine)


async def test_cancel_10_of_100(engine: AsyncLLM) -> None:
    started = {i: asyncio.Event() for i in range(100)}

    async def consume(i: int) -> int:
        count = 0
        sp = params(max_tokens=400 if i < 10 else 20)
        async for out in engine.generate("Tell me a story", sp, f"c{i}"):
            count += len(out.outputs[0].token_ids)
            started[i].set()
        return count

    tasks = [asyncio.create_task(consume(i)) for i in range(100)]
    await asyncio.gather(*(started[i].wait() for i in range(10)))
    for task in tasks[:10]:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results[:10])
    assert results[10:] == [20] * 90
    await assert_engine_clean(engine)


async def test_abort_ends_streams_with_abort(engine: AsyncLLM) -> None:
    seen = {i: asyncio.Event() for i in range(10)}

    async def consume(i: int):
        outs = []
        async for out in engine.generate("Once", params(max_tokens=300 if i < 5 else 15), f"a{i}"):
            outs.append(out)
            seen[i].set()
        return outs

    tasks = [asyncio.create_task(consume(i)) for i in range(10)]
    await asyncio.gather(*(seen[i].wait() for i in range(5)))
    await engine.abort([f"a{i}" for i in range(5)])
    results = await asyncio.gather(*tasks)
    for outs in results[:5]:
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
        assert 0 < sum(len(o.outputs[0].token_ids) for o in outs) < 300
    for outs in results[5:]:
        assert sum(len(o.outputs[0].token_ids) for o in outs) == 15
    await assert_engine_clean(engine)


async def test_breaking_out_drops_the_request_and_frees_the_id(engine: AsyncLLM) -> None:
    count = 0
    gen = engine.generate("Hello", params(max_tokens=500), "brk")
    async for out in gen:
        count += len(out.outputs[0].token_ids)
        if count >= 5:
            break
    await gen.aclose()
    await assert_engine_clean(engine, timeout=1.0)
    outs = await collect(engine, "brk", params(max_tokens=3))
    assert sum(len(o.outputs[0].token_ids) for o in outs) == 3


async def test_running_id_cannot_be_reused(engine: AsyncLLM) -> None:
    gen = engine.generate("Hello", params(max_tokens=200), "dup")
    await gen.__anext__()
    with pytest.raises(ValueError, match="already running"):
        await collect(engine, "dup", params())
    await gen.aclose()
    await assert_engine_clean(engine)


@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY])
async def test_n_3_with_seed(engine: AsyncLLM, kind: RequestOutputKind) -> None:
    sp = SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=11, ignore_eos=True,
                        output_kind=kind)
    outs = await collect(engine, f"n3-{kind.name}", sp)
    tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for out in outs:
        for c in out.outputs:
            tokens[c.index].extend(c.token_ids)
    assert all(len(t) == 6 for t in tokens.values())
    if kind == RequestOutputKind.FINAL_ONLY:
        assert len(outs) == 1 and sorted(c.index for c in outs[0].outputs) == [0, 1, 2]
    again = await collect(engine, f"n3b-{kind.name}", sp)
    tokens2: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for out in again:
        for c in out.outputs:
            tokens2[c.index].extend(c.token_ids)
    assert tokens == tokens2
    await assert_engine_clean(engine)


async def test_pause_abort_mode(engine: AsyncLLM) -> None:
    task = asyncio.create_task(collect(engine, "p-abort", params(max_tokens=400)))
    await asyncio.sleep(0.2)
    await engine.pause_generation(mode="abort")
    assert await engine.is_paused()
    outs = await task
    assert outs[-1].outputs[0].finish_reason == "abort"
    waiting = asyncio.create_task(collect(engine, "p-new", params(max_tokens=5)))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await engine.pause_generation(mode="abort")  # twice is harmless
    await engine.resume_generation()
    outs = await waiting
    assert sum(len(o.outputs[0].token_ids) for o in outs) == 5
    await engine.resume_generation()  # resuming when not paused is harmless
    await assert_engine_clean(engine)


async def test_pause_wait_mode(engine: AsyncLLM) -> None:
    task = asyncio.create_task(collect(engine, "p-wait", params(max_tokens=30)))
    await asyncio.sleep(0.05)
    await engine.pause_generation(mode="wait")
    assert task.done()
    outs = task.result()
    assert sum(len(o.outputs[0].token_ids) for o in outs) == 30
    await engine.resume_generation()
    await engine.pause_generation(mode="wait")  # with nothing in flight
    await engine.resume_generation()
    await assert_engine_clean(engine)


async def test_pause_keep_mode_loses_no_token(engine: AsyncLLM) -> None:
    sp = params(max_tokens=60, kind=RequestOutputKind.DELTA)
    reference = await collect(engine, "k-ref", sp)
    ref_tokens = [t for o in reference for t in o.outputs[0].token_ids]
    task = asyncio.create_task(collect(engine, "k-run", sp))
    await asyncio.sleep(0.05)
    await engine.pause_generation(mode="keep")
    await asyncio.sleep(0.3)
    stats = await engine.get_scheduler_stats()
    assert task.done() or stats.num_running_reqs == 1
    await engine.resume_generation()
    outs = await task
    assert [t for o in outs for t in o.outputs[0].token_ids] == ref_tokens
    await assert_engine_clean(engine)


async def test_invalid_parameters_raise_value_error(engine: AsyncLLM) -> None:
    with pytest.raises(ValueError):
        await collect(engine, "bad1", params(), prompt="")
    with pytest.raises(ValueError):
        await collect(engine, "bad2", SamplingParams(max_tokens=5, logprobs=50))
    with pytest.raises(ValueError):
        [o async for o in engine.generate({"prompt_token_ids": [10**8]}, params(), "bad3")]
    await engine.check_health()
    outs = await collect(engine, "ok-after-bad", params(max_tokens=3))
    assert sum(len(o.outputs[0].token_ids) for o in outs) == 3
    await assert_engine_clean(engine)


async def test_greedy_matches_llm(engine: AsyncLLM, tiny_llama_path: Path) -> None:
    prompts = ["Once upon a time", "def fib(n):", "The capital of France is"]
    sp = SamplingParams(max_tokens=12, temperature=0.0,
                        output_kind=RequestOutputKind.FINAL_ONLY)
    asynced = await asyncio.gather(*(collect(engine, f"g{i}", sp, p)
                                     for i, p in enumerate(prompts)))
    llm = LLM(str(tiny_llama_path), kv_cache_memory_gb=0.05)
    offline = llm.generate(prompts, sp, use_tqdm=False)
    assert [a[-1].outputs[0].token_ids for a in asynced] == [o.outputs[0].token_ids
                                                             for o in offline]


async def test_kill_9_of_the_core(tiny_llama_path: Path) -> None:
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(tiny_llama_path), kv_cache_memory_gb=0.05, disable_log_stats=True))
    try:
        started = asyncio.Event()

        async def consume(i: int) -> BaseException | None:
            try:
                async for _ in engine.generate("Hi", params(max_tokens=100000 // 50), f"k{i}"):
                    started.set()
            except EngineDeadError as exc:
                return exc
            return None

        tasks = [asyncio.create_task(consume(i)) for i in range(20)]
        await started.wait()
        os.kill(engine.engine_core.proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        t0 = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
        assert time.monotonic() - t0 < 5
        assert all(isinstance(r, EngineDeadError) for r in results)
        with pytest.raises(EngineDeadError):
            await engine.check_health()
        assert engine.errored and not engine.is_running
        with pytest.raises(EngineDeadError):
            await collect(engine, "after-death", params())
    finally:
        engine.shutdown()
        engine.shutdown()  # idempotent
    assert not engine.engine_core.proc.is_alive()  # type: ignore[attr-defined]


def test_bad_model_path_leaves_no_process(tmp_path: Path) -> None:
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="does not exist|not found"):
        AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(tmp_path / "missing")))
    assert set(multiprocessing.active_children()) == before


def test_core_load_failure_reports_the_core_error(tmp_path: Path, tiny_llama_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_llama_path.iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    before = set(multiprocessing.active_children())
    with pytest.raises(RuntimeError, match="engine core failed to start.*safetensors"):
        AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(broken), kv_cache_memory_gb=0.05))
    assert set(multiprocessing.active_children()) == before


async def test_async_context_manager(tiny_llama_path: Path) -> None:
    args = AsyncEngineArgs(model=str(tiny_llama_path), kv_cache_memory_gb=0.05,
                           multiprocess=False, disable_log_stats=True)
    async with AsyncLLM.from_engine_args(args) as engine:
        outs = await collect(engine, "inproc", params(max_tokens=4))
        assert sum(len(o.outputs[0].token_ids) for o in outs) == 4
        await assert_engine_clean(engine)
    assert engine.is_stopped


def test_core_exits_when_the_client_is_killed(tiny_llama_path: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "client.py"
    script.write_text(
        "import sys, time\n"
        "from kvflow.config import AsyncEngineArgs\n"
        "from kvflow.engine.async_llm import AsyncLLM\n"
        "if __name__ == '__main__':\n"
        f"    e = AsyncLLM.from_engine_args(AsyncEngineArgs(model={str(tiny_llama_path)!r},"
        " kv_cache_memory_gb=0.05, disable_log_stats=True))\n"
        "    print(e.engine_core.proc.pid, flush=True)\n"
        "    time.sleep(120)\n"
    )
    client = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    assert client.stdout is not None
    core_pid = int(client.stdout.readline())
    client.kill()
    client.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{core_pid}").exists():
        status = Path(f"/proc/{core_pid}/status").read_text() if Path(
            f"/proc/{core_pid}/status").exists() else ""
        if "zombie" in status:
            break
        assert time.monotonic() < deadline, "the engine core outlived its client"
        time.sleep(0.2)


async def test_a_request_that_fails_on_its_way_leaves_nothing(engine: AsyncLLM,
                                                              monkeypatch) -> None:
    """A send that fails after registration unregisters the request and aborts sent siblings."""
    sent: list[str] = []
    aborted: list[str] = []
    real_add, real_abort = engine.engine_core.add_request, engine.engine_core.abort_requests

    def failing_add(request, affinity=None) -> None:  # the second child cannot be sent
        if len(sent) == 1:
            raise OverflowError("cannot encode")
        sent.append(request.request_id)
        real_add(request, affinity)

    def recording_abort(ids: list[str]) -> None:
        aborted.extend(ids)
        real_abort(ids)

    monkeypatch.setattr(engine.engine_core, "add_request", failing_add)
    monkeypatch.setattr(engine.engine_core, "abort_requests", recording_abort)
    with pytest.raises(OverflowError):
        await collect(engine, "half-sent", params(max_tokens=50, n=3))
    monkeypatch.undo()
    assert sent and set(sent) <= set(aborted)
    assert "half-sent" not in engine.parents
    await assert_engine_clean(engine)


async def test_out_of_range_values_are_value_errors(engine: AsyncLLM) -> None:
    for bad in (dict(seed=2**64), dict(seed=-(2**63) - 1), dict(top_k=10**30),
                dict(max_tokens=10**30)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="priority"):
        [o async for o in engine.generate("Hi", params(), "prio", priority=10**30)]
    with pytest.raises(ValueError, match="lone surrogate"):
        await collect(engine, "surrogate", params(), prompt="a\ud800b")
    with pytest.raises(ValueError, match=r"bad_words\[1\]"):
        await collect(engine, "bad-word", params(bad_words=["ok", "x\udc00"]))
    sp = SamplingParams(max_tokens=2, n=3, seed=2**63 - 1, output_kind=RequestOutputKind.DELTA)
    outs = await collect(engine, "wrapping-seed", sp)
    assert {c.index for o in outs for c in o.outputs} == {0, 1, 2}
    await assert_engine_clean(engine)
