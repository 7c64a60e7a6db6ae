"""Memory: resident size of the engine-core process and of the client process over a long run
of short requests through AsyncLLM, and whether either grows.

Workload: --num-requests (default 10,000) requests of 4-16 prompt tokens (slices of the
tokenized TEXT_SEED corpus, fixed seed) and 1-4 output tokens (ignore_eos), greedy and
temperature 0.8 alternating, DELTA and CUMULATIVE output alternating, at most --concurrency
in flight at once. Every --abort-every'th request is aborted by cancelling its consumer task:
half of those right after the request is queued, half after its first output (they ask for 4
tokens, so the first output is never the last).

Resident sizes (VmRSS from /proc) are sampled once the first --warmup requests are done, then
every --sample-every requests, and at the end; at each sample point the in-flight requests
are drained first, the engine is checked to hold no request state (client streams, core
requests, KV blocks in use), and --settle-s passes, so every sample is of an idle engine.
Pass criteria (from the performance issue): the core's peak RSS (VmHWM) <= float32 weights +
configured KV cache + 0.5 GiB, the client's peak <= 0.5 GiB, and neither's idle RSS grows by
more than --growth-tolerance-mib from warm-up to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import time
from pathlib import Path
from typing import Any

from common import TEXT_SEED, write_result

from kvflow import RequestOutputKind, SamplingParams
from kvflow.config import AsyncEngineArgs
from kvflow.engine.async_llm import AsyncLLM
from kvflow.model.registry import resolve_model

GIB = 1 << 30
MIB = 1 << 20
HEADROOM = GIB // 2  # the allowance above weights + KV cache, and the client's limit


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) of a process, in bytes."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) * 1024  # the kernel reports kB
    return values


def float32_weight_bytes(path: Path) -> tuple[int, int]:
    """(parameter count, bytes as float32) of a model folder's safetensors, read from headers."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {path}")
    numel = 0
    for file in files:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                numel += math.prod(f.get_slice(name).get_shape())
    return numel, numel * 4


def make_requests(tokenizer: Any, num: int, seed: int,
                  abort_every: int) -> list[tuple[list[int], SamplingParams, str | None]]:
    """(prompt ids, params, abort mode: None, "early" or "mid") per request, fixed seed."""
    rng = random.Random(seed)
    corpus = tokenizer(TEXT_SEED * 200)["input_ids"]
    work: list[tuple[list[int], SamplingParams, str | None]] = []
    for i in range(num):
        plen = rng.randint(4, 16)
        start = rng.randint(0, len(corpus) - plen - 1)
        abort = None
        if abort_every > 0 and i % abort_every == abort_every - 1:
            abort = "early" if (i // abort_every) % 2 == 0 else "mid"
        kind = RequestOutputKind.DELTA if (i // 2) % 2 == 0 else RequestOutputKind.CUMULATIVE
        sp = SamplingParams(max_tokens=4 if abort else rng.randint(1, 4),
                            temperature=0.0 if i % 2 == 0 else 0.8, ignore_eos=True,
                            output_kind=kind)
        work.append((corpus[start:start + plen], sp, abort))
    return work


async def engine_state(engine: AsyncLLM) -> dict[str, Any]:
    """What request state the engine still holds, on the client side and in the core."""
    stats = await engine.get_scheduler_stats()
    return {
        "client_streams": len(engine.output_processor.states),
        "client_parents": len(engine.parents),
        "client_held": len(engine.held),
        "core_requests": await engine.get_num_unfinished_requests_in_core(),
        "core_running": stats.num_running_reqs,
        "core_waiting": stats.num_waiting_reqs,
        "kv_cache_usage": stats.kv_cache_usage,
    }


async def wait_clean(engine: AsyncLLM, timeout: float = 10.0) -> tuple[bool, dict[str, Any]]:
    """Poll until the engine holds no request state (aborts cross the ZMQ socket late)."""
    deadline = time.monotonic() + timeout
    while True:
        state = await engine_state(engine)
        clean = not any(state.values()) and not engine.has_unfinished_requests()
        if clean or time.monotonic() > deadline:
            return clean, state
        await asyncio.sleep(0.05)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    path = resolve_model(args.model)
    num_params, weights = float32_weight_bytes(path)
    kv_bytes = int(args.kv_gb * GIB)
    core_limit = weights + kv_bytes + HEADROOM
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=args.model, kv_cache_memory_gb=args.kv_gb, max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=not args.no_prefix_caching, disable_log_stats=True))
    proc = getattr(engine.engine_core, "proc", None)
    if proc is None or proc.pid is None:
        engine.shutdown()
        raise SystemExit("memory: the engine core is not in its own process (multiprocess off?)")
    core_pid, client_pid = proc.pid, os.getpid()
    core_start = proc_memory(core_pid)  # loaded, no request served yet
    work = make_requests(engine.get_tokenizer(), args.num_requests, args.seed, args.abort_every)

    counts = {"finished": 0, "aborted": 0, "abort_too_late": 0, "tokens": 0}
    samples: list[dict[str, Any]] = []
    dirty: list[dict[str, Any]] = []

    async def consume(i: int, prompt: list[int], sp: SamplingParams,
                      first: asyncio.Event) -> int:
        tokens = 0
        async for out in engine.generate({"prompt_token_ids": prompt}, sp, f"m{i}"):
            first.set()
            tokens = len(out.outputs[0].token_ids) + (
                tokens if sp.output_kind == RequestOutputKind.DELTA else 0)
        return tokens

    async def one(i: int, sem: asyncio.Semaphore) -> None:
        prompt, sp, abort = work[i]
        first = asyncio.Event()
        try:
            task = asyncio.create_task(consume(i, prompt, sp, first))
            if abort == "early":
                await asyncio.sleep(0)  # the task runs up to its first wait: request queued
            elif abort == "mid":
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(first.wait(), timeout=60)
            if abort is not None:
                task.cancel()
            try:
                tokens = await task  # (not `counts[...] += await task`: that races)
                counts["tokens"] += tokens
                counts["finished" if abort is None else "abort_too_late"] += 1
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise  # this coroutine itself was cancelled
                counts["aborted"] += 1
        finally:
            sem.release()

    async def sample(label: str, done: int, pending: set[asyncio.Task[None]]) -> None:
        if pending:
            await asyncio.gather(*pending)
            pending.clear()
        clean, state = await wait_clean(engine)
        if not clean:
            dirty.append({"at": label, "requests_done": done, **state})
        await asyncio.sleep(args.settle_s)  # the idle core hands its freed heap back first
        core, client = proc_memory(core_pid), proc_memory(client_pid)
        samples.append({
            "at": label, "requests_done": done, "elapsed_s": round(time.perf_counter() - t0, 2),
            "core_rss_mib": round(core["VmRSS"] / MIB, 1),
            "core_anon_mib": round(core.get("RssAnon", 0) / MIB, 1),
            "client_rss_mib": round(client["VmRSS"] / MIB, 1),
            "clean": clean,
        })

    warmup = min(args.warmup, args.num_requests)
    points = {warmup: "warmup", args.num_requests: "end"}
    for k in range(args.sample_every, args.num_requests, args.sample_every):
        if k > warmup:
            points.setdefault(k, str(k))
    sem = asyncio.Semaphore(args.concurrency)
    pending: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter()
    try:
        for i in range(args.num_requests):
            await sem.acquire()
            task = asyncio.create_task(one(i, sem))
            pending.add(task)
            task.add_done_callback(pending.discard)
            if i + 1 in points:
                await sample(points[i + 1], i + 1, pending)
        elapsed = time.perf_counter() - t0
        final_clean, final_state = await wait_clean(engine)
        core_end, client_end = proc_memory(core_pid), proc_memory(client_pid)
    finally:
        engine.shutdown()

    warm, end = samples[0], samples[-1]
    core_growth = end["core_rss_mib"] - warm["core_rss_mib"]
    client_growth = end["client_rss_mib"] - warm["client_rss_mib"]
    tol = args.growth_tolerance_mib
    return {
        "benchmark": "memory", "model": path.name, "requests": args.num_requests,
        "concurrency": args.concurrency, "max_num_seqs": args.max_num_seqs,
        "prefix_caching": not args.no_prefix_caching, **counts,
        "elapsed_s": round(elapsed, 1), "req_s": round(args.num_requests / elapsed, 1),
        "num_params": num_params,
        "weights_f32_mib": round(weights / MIB, 1), "kv_cache_mib": round(kv_bytes / MIB, 1),
        "core_limit_mib": round(core_limit / MIB, 1),
        "core_rss_start_mib": round(core_start["VmRSS"] / MIB, 1),
        "core_rss_warmup_mib": warm["core_rss_mib"], "core_rss_end_mib": end["core_rss_mib"],
        "core_peak_mib": round(core_end["VmHWM"] / MIB, 1),
        "core_growth_mib": round(core_growth, 1),
        "client_limit_mib": round(HEADROOM / MIB, 1),
        "client_rss_warmup_mib": warm["client_rss_mib"],
        "client_rss_end_mib": end["client_rss_mib"],
        "client_peak_mib": round(client_end["VmHWM"] / MIB, 1),
        "client_growth_mib": round(client_growth, 1),
        "growth_tolerance_mib": tol,
        "core_within_limit": core_end["VmHWM"] <= core_limit,  # the peak, not the idle size
        "client_within_limit": client_end["VmHWM"] <= HEADROOM,
        "core_no_growth": core_growth < tol, "client_no_growth": client_growth < tol,
        "state_clean": final_clean and not dirty, "final_state": final_state,
        "unclean_samples": dirty, "samples": samples,
    }


def summary(r: dict[str, Any]) -> str:
    def ok(flag: bool) -> str:
        return "ok" if flag else "FAIL"

    return (
        f"memory: core RSS {r['core_rss_start_mib']:.0f} at start, "
        f"{r['core_rss_warmup_mib']:.0f} -> {r['core_rss_end_mib']:.0f} MiB "
        f"(peak {r['core_peak_mib']:.0f}; limit {r['core_limit_mib']:.0f} = f32 weights "
        f"{r['weights_f32_mib']:.0f} + KV {r['kv_cache_mib']:.0f} + 512) "
        f"{ok(r['core_within_limit'])}, growth {r['core_growth_mib']:+.1f} MiB "
        f"{ok(r['core_no_growth'])}; client RSS {r['client_rss_warmup_mib']:.0f} -> "
        f"{r['client_rss_end_mib']:.0f} MiB (peak {r['client_peak_mib']:.0f}; limit 512) "
        f"{ok(r['client_within_limit'])}, growth {r['client_growth_mib']:+.1f} MiB "
        f"{ok(r['client_no_growth'])}; {r['requests']} requests ({r['aborted']} aborted) in "
        f"{r['elapsed_s']:.0f} s, engine state {'clean' if r['state_clean'] else 'NOT CLEAN'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=256, help="requests in flight")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--kv-gb", type=float, default=1.0, help="kv_cache_memory_gb")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--abort-every", type=int, default=10,
                        help="cancel every Nth request's consumer (0: none)")
    parser.add_argument("--warmup", type=int, default=200, help="requests before the baseline")
    parser.add_argument("--sample-every", type=int, default=1000)
    parser.add_argument("--growth-tolerance-mib", type=float, default=64.0)
    parser.add_argument("--settle-s", type=float, default=1.0,
                        help="idle wait before each sample (the core trims its heap at 0.5 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/results/memory.json")
    args = parser.parse_args()
    if args.num_requests < 1 or args.concurrency < 1 or args.sample_every < 1:
        parser.error("--num-requests, --concurrency and --sample-every must be >= 1")
    result = asyncio.run(run(args))
    write_result(args.json, result)
    print(summary(result))


if __name__ == "__main__":
    main()
