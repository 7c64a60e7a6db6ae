"""Soak: hold `kvflow serve` at ~1.5x its capacity for a set time with mixed, hostile traffic.

1. Start `kvflow serve` (default model, CPU) with a bounded batch and queue, so that load past
   capacity is answered with 503 rather than an ever longer queue.
2. Probe capacity: a closed loop of max-num-seqs clients sending the valid requests of the mix
   for --probe-seconds; capacity = requests finished per second.
3. Drive Poisson arrivals for --minutes, the valid requests at --load x capacity: streaming
   and non-streaming chat and completions, n>1, logprobs, json_schema structured output. On
   top come streams the client drops mid-way, requests it aborts before the answer, and
   malformed bodies (bad JSON, wrong types, oversize values), which must get a 4xx.
4. After the traffic stops, read the leak gauges from /metrics (request state, and KV blocks
   held by requests: cached prefix blocks are not leaks) and fit the server process tree's
   resident memory, sampled every few seconds after the warm-up, to a line (MiB/hour).

Prints a table by request kind and one result line; --out writes every figure as JSON. Exits
1 when a 5xx other than 503 or a leak was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from common import free_port, start_server, stop_server, write_result

from kvflow.entrypoints.bench_serve import WORDS, iter_sse

OUTCOMES = ("ok", "4xx_expected", "503_overload", "cancelled", "5xx_other", "other")
LEAK_GAUGES = ("kvflow:frontend_requests", "kvflow:num_requests_running",
               "kvflow:num_requests_waiting", "kvflow:kv_cache_blocks_in_use")
VALID_KINDS = 6
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"]}


class Load:
    """One soak run's client side: the model name, a seeded generator, what was seen."""

    def __init__(self, client: httpx.AsyncClient, model: str, seed: int) -> None:
        self.client, self.model, self.rng = client, model, random.Random(seed)
        self.outcomes: dict[str, Counter[str]] = {}
        self.ttfts: list[float] = []  # seconds, streamed requests the server accepted
        self.errors: list[str] = []  # a sample of the unexpected answers

    def record(self, kind: str, outcome: str, detail: str = "") -> None:
        self.outcomes.setdefault(kind, Counter())[outcome] += 1
        if outcome in ("5xx_other", "other") and len(self.errors) < 20:
            self.errors.append(f"{kind}: {detail[:300]}")

    # ---- request bodies ------------------------------------------------------------------
    def text(self) -> str:
        start, length = self.rng.randrange(len(WORDS)), self.rng.randint(8, 64)
        return " ".join(WORDS[(start + k) % len(WORDS)] for k in range(length))

    def chat(self, **extra: Any) -> dict[str, Any]:
        return {"model": self.model, "max_tokens": self.rng.randint(8, 48), "temperature": 0.8,
                "messages": [{"role": "user", "content": "Continue: " + self.text()}], **extra}

    def completion(self, **extra: Any) -> dict[str, Any]:
        return {"model": self.model, "max_tokens": self.rng.randint(8, 48), "temperature": 0.8,
                "prompt": self.text(), **extra}

    def malformed(self) -> tuple[str, bytes]:
        """A body the server must refuse with a 4xx."""
        chat, comp, words = "/v1/chat/completions", "/v1/completions", "word " * 20000
        bad: list[tuple[str, Any]] = [
            (comp, b'{"model": "m", "prompt": "hi", "max_tokens": 8'),  # truncated JSON
            (chat, b"\xff\xfe not json at all"),
            (comp, self.completion(max_tokens="eight")),
            (chat, {"model": self.model, "messages": "hello"}),
            (comp, self.completion(temperature="hot")),
            (comp, self.completion(n=100_000)),
            (comp, self.completion(max_tokens=10**12)),
            (comp, self.completion(logprobs=10**6)),
            (chat, self.chat(logprobs=True, top_logprobs=10**4)),
            (comp, self.completion(prompt=words)),  # longer than the model's context
            (comp, self.completion(stop=["x"] * 10_000)),
            (comp, self.completion(prompt=[[-5, 10**12]])),
            (chat, self.chat(response_format={"type": "json_schema",
                                              "json_schema": {"name": "x", "schema": 7}})),
        ]
        path, body = self.rng.choice(bad)
        return path, body if isinstance(body, bytes) else json.dumps(body).encode()

    # ---- requests ------------------------------------------------------------------------
    async def post(self, kind: str, path: str, body: dict[str, Any]) -> None:
        response = await self.client.post(path, json=body)
        self.record(kind, status_outcome(response.status_code), response.text)

    async def stream(self, kind: str, path: str, body: dict[str, Any],
                     drop_after: int | None = None) -> None:
        """Stream a request; with drop_after, close the connection after that many chunks."""
        start, chunks = time.perf_counter(), 0
        async with self.client.stream("POST", path, json={**body, "stream": True}) as resp:
            if resp.status_code != 200:
                await resp.aread()
                self.record(kind, status_outcome(resp.status_code), resp.text)
                return
            async for event in iter_sse(resp):
                if "error" in event:
                    self.record(kind, "other", f"error event: {event['error']}")
                    return
                if any(c.get("text") or (c.get("delta") or {}).get("content")
                       for c in event.get("choices") or []):
                    if chunks == 0:
                        self.ttfts.append(time.perf_counter() - start)
                    chunks += 1
                    if drop_after is not None and chunks >= drop_after:
                        self.record(kind, "cancelled")
                        return  # leaving the block closes the connection mid-stream
        self.record(kind, "ok")  # (a first sampled token may be EOS: no text, still ok)

    async def send_malformed(self, kind: str) -> None:
        path, body = self.malformed()
        response = await self.client.post(path, content=body,
                                          headers={"content-type": "application/json"})
        status = response.status_code
        outcome = "4xx_expected" if 400 <= status < 500 else status_outcome(status)
        self.record(kind, "other" if outcome == "ok" else outcome,
                    f"HTTP {status} for {body[:120]!r}: {response.text}")

    async def abort(self, kind: str) -> None:
        """Send a request, then give up on it before its answer can be complete."""
        task = asyncio.ensure_future(self.post(kind, "/v1/completions",
                                               self.completion(max_tokens=64)))
        done, _ = await asyncio.wait({task}, timeout=self.rng.uniform(0.05, 2.0))
        if done:
            task.result()
            return
        task.cancel()
        self.record(kind, "cancelled")


def status_outcome(status: int) -> str:
    if status == 200:
        return "ok"
    if status == 503:
        return "503_overload"
    return "5xx_other" if status >= 500 else "other"


def request_mix(load: Load) -> dict[str, tuple[float, Callable[[], Awaitable[None]]]]:
    """Kind -> (weight, send one). The first VALID_KINDS are complete, valid requests: the
    capacity probe's, and the load that --load scales."""
    chat, comp = "/v1/chat/completions", "/v1/completions"
    rng = load.rng
    return {
        "chat_stream": (20, lambda: load.stream("chat_stream", chat, load.chat())),
        "chat": (10, lambda: load.post("chat", chat, load.chat())),
        "completion_stream": (15, lambda: load.stream("completion_stream", comp,
                                                      load.completion())),
        "completion": (10, lambda: load.post("completion", comp, load.completion())),
        "n>1_logprobs": (10, lambda: load.post("n>1_logprobs", comp, load.completion(
            n=rng.randint(2, 3), logprobs=2))),
        "structured": (8, lambda: load.post("structured", chat, load.chat(
            max_tokens=48, response_format={"type": "json_schema", "json_schema": {
                "name": "person", "schema": SCHEMA}}))),
        "disconnect": (9, lambda: load.stream("disconnect", chat, load.chat(
            max_tokens=48, logprobs=True, top_logprobs=2), drop_after=rng.randint(1, 6))),
        "abort": (8, lambda: load.abort("abort")),
        "malformed": (10, lambda: load.send_malformed("malformed")),
    }


async def guarded(load: Load, kind: str, send: Callable[[], Awaitable[None]]) -> None:
    """Run one request; any failure (transport, a garbled answer) is an outcome, never the
    end of the soak."""
    try:
        await send()
    except Exception as exc:
        load.record(kind, "other", f"{type(exc).__name__}: {exc}")


async def probe_capacity(load: Load, concurrency: int, seconds: float) -> float:
    """Requests per second with `concurrency` valid requests always in flight."""
    mix = list(request_mix(load).items())[:VALID_KINDS]
    kinds, weights = [k for k, _ in mix], [w for _, (w, _) in mix]
    sends = dict((k, s) for k, (_, s) in mix)
    deadline = time.monotonic() + seconds
    finished = 0

    async def worker() -> None:
        nonlocal finished
        while time.monotonic() < deadline:
            kind = load.rng.choices(kinds, weights)[0]
            await guarded(load, kind, sends[kind])
            finished += 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return finished / (time.monotonic() - start)


async def drive(load: Load, rate: float, seconds: float) -> int:
    """Poisson arrivals of the whole mix at `rate` for `seconds`; waits for the last answer."""
    mix = request_mix(load)
    kinds, weights = list(mix), [w for w, _ in mix.values()]
    tasks: set[asyncio.Task[None]] = set()
    deadline, sent = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        await asyncio.sleep(load.rng.expovariate(rate))
        kind = load.rng.choices(kinds, weights)[0]
        task = asyncio.create_task(guarded(load, kind, mix[kind][1]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += 1
    if tasks:
        await asyncio.wait(tasks)
    return sent


class MemorySampler:
    """Resident memory (MiB) of a process and all its children, every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 5.0) -> None:
        self.root, self.interval = psutil.Process(pid), interval
        self.samples: list[tuple[float, float]] = []  # (monotonic seconds, MiB)

    def rss_mib(self) -> float:
        total = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):  # a helper that just exited
                total += proc.memory_info().rss
        return total / 2**20

    async def run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), self.rss_mib()))
            await asyncio.sleep(self.interval)

    def growth_mib_per_hour(self, after: float) -> float:
        """Least-squares slope of the samples taken from `after` (monotonic) on."""
        points = np.array([(t, m) for t, m in self.samples if t >= after])
        if len(points) < 3:
            return float("nan")
        return float(np.polyfit(points[:, 0] / 3600.0, points[:, 1], 1)[0])


async def leak_gauges(client: httpx.AsyncClient, timeout_s: float = 30.0) -> dict[str, float]:
    """The leak gauges once they are all 0, or their values at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = (await client.get("/metrics")).text
        values = {name: 0.0 for name in LEAK_GAUGES}
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in values:
                values[name] = float(line.rsplit(" ", 1)[1])
        if not any(values.values()) or time.monotonic() > deadline:
            return values
        await asyncio.sleep(0.5)


async def soak(args: argparse.Namespace, base_url: str, pid: int) -> dict[str, Any]:
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        probe = Load(client, model, args.seed)
        capacity = await probe_capacity(probe, args.max_num_seqs, args.probe_seconds)
        # Dropped, aborted and malformed requests cost little: the valid ones alone arrive
        # at load x capacity, the others on top.
        weights = [w for w, _ in request_mix(probe).values()]
        rate = args.load * capacity * sum(weights) / sum(weights[:VALID_KINDS])
        print(f"capacity {capacity:.2f} req/s: driving {rate:.2f} req/s "
              f"for {args.minutes} min", flush=True)
        memory = MemorySampler(pid)
        sampler = asyncio.create_task(memory.run())
        load = Load(client, model, args.seed + 1)
        start = time.monotonic()
        sent = await drive(load, rate, args.minutes * 60)
        sampler.cancel()
        leaks = await leak_gauges(client)
    warmup = min(args.warmup_seconds, args.minutes * 60 / 3)
    totals = Counter[str]()
    for counts in load.outcomes.values():
        totals.update(counts)
    ttft = np.array(load.ttfts or [float("nan")]) * 1000
    return {
        "benchmark": "soak", "minutes": args.minutes, "load": args.load,
        "capacity_req_s": capacity, "rate_req_s": rate, "requests": sent,
        "outcomes": {k: totals[k] for k in OUTCOMES},
        "by_kind": {kind: dict(c) for kind, c in sorted(load.outcomes.items())},
        "probe_outcomes": dict(sum(probe.outcomes.values(), Counter[str]())),
        "5xx_other": totals["5xx_other"], "leaks": leaks,
        "leaked_kv_blocks": leaks["kvflow:kv_cache_blocks_in_use"],
        "leaked_requests": sum(v for k, v in leaks.items() if "blocks" not in k),
        "rss_growth_mib_per_hour": memory.growth_mib_per_hour(start + warmup),
        "rss_start_mib": memory.samples[0][1], "rss_end_mib": memory.rss_mib(),
        "ttft_p50_ms": float(np.percentile(ttft, 50)),
        "ttft_p99_ms": float(np.percentile(ttft, 99)), "ttft_samples": len(load.ttfts),
        "unexpected": load.errors,
    }


def report(r: dict[str, Any]) -> str:
    lines = [f"{'kind':<18}" + "".join(f"{o:>14}" for o in OUTCOMES)]
    for kind, counts in r["by_kind"].items():
        lines.append(f"{kind:<18}" + "".join(f"{counts.get(o, 0):>14}" for o in OUTCOMES))
    lines += [f"unexpected: {e}" for e in r["unexpected"][:5]]
    o = r["outcomes"]
    lines.append(
        f"soak, {r['minutes']:g} min, valid requests at {r['load']:g}x capacity ("
        f"{r['capacity_req_s']:.2f} req/s; all kinds {r['rate_req_s']:.2f} req/s): "
        f"{r['requests']} requests: ok {o['ok']}, 4xx "
        f"expected {o['4xx_expected']}, 503 {o['503_overload']}, cancelled {o['cancelled']}, "
        f"other {o['other']}; 5xx other than 503: {r['5xx_other']}; leaked: "
        f"{r['leaked_kv_blocks']:g} KV blocks, {r['leaked_requests']:g} requests; RSS "
        f"{r['rss_growth_mib_per_hour']:+.1f} MiB/h ({r['rss_end_mib']:.0f} MiB at end); "
        f"TTFT p50 {r['ttft_p50_ms']:.0f} ms, p99 {r['ttft_p99_ms']:.0f} ms")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to drive load")
    parser.add_argument("--load", type=float, default=1.5, help="arrival rate / capacity")
    parser.add_argument("--probe-seconds", type=float, default=60.0)
    parser.add_argument("--warmup-seconds", type=float, default=120.0,
                        help="memory samples before this are left out of the fit")
    parser.add_argument("--max-num-seqs", type=int, default=32,
                        help="the server's batch bound (and the probe's concurrency)")
    parser.add_argument("--max-waiting-requests", type=int, default=32,
                        help="the server's queue bound: past it, 503")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logs", default="/tmp", help="folder for the server's log")
    parser.add_argument("--out", default=None, help="write every figure as JSON here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the server

    port = free_port()
    cmd = [sys.executable, "-m", "kvflow.entrypoints.cli", "serve", "--port", str(port),
           "--disable-access-log", "--seed", str(args.seed),
           "--max-num-seqs", str(args.max_num_seqs),
           "--max-waiting-requests", str(args.max_waiting_requests)]
    proc = start_server(cmd, port, Path(args.logs) / "kvflow-soak.log")
    try:
        result = asyncio.run(soak(args, f"http://127.0.0.1:{port}", proc.pid))
    finally:
        stop_server(proc)
    print(report(result), flush=True)
    if args.out:
        write_result(args.out, result)
    failed = result["5xx_other"] or result["leaked_kv_blocks"] or result["leaked_requests"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
