"""`kvflow bench serve`: a fixed-seed streaming workload against any OpenAI-compatible server.

Prompts are windows of random length over a fixed text; each asks for a random number of
output tokens (with `ignore_eos`, so it gets exactly that many from servers that honour
it). Requests arrive as a Poisson process at --request-rate, or as fast as
--max-concurrency allows; every response is streamed and timed:

    TTFT: request sent → first text        ITL: gap between consecutive text chunks
    TPOT: (latency - TTFT) / (output tokens - 1)   E2EL: request sent → last byte
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# A fixed text, so the same seed always sends the same prompts.
_TEXT = (
    "The river town woke slowly on market days. Bakers opened their shutters before dawn, "
    "and the smell of bread drifted down to the docks where fishermen sorted the night's "
    "catch. Children ran between the stalls, counting coins and arguing about which sweets "
    "were worth the price. An old clockmaker repaired watches at a narrow table by the "
    "bridge, explaining to anyone who lingered how each gear depended on the next, and how "
    "a single worn tooth could make a whole mechanism lose an hour in a week. Travelers "
    "arrived with carts of wool, copper pans, maps of distant valleys, and stories that grew "
    "longer every time they were told. In the afternoon the square filled with music, and "
    "merchants traded news about harvests, storms, roads washed out by spring floods, and a "
    "new library being built on the hill. By evening the lamps were lit one by one, the "
    "river reflected their small flames, and the town settled into the quiet rhythm of "
    "people talking softly over dinner about what tomorrow might bring."
)
WORDS = _TEXT.split()


@dataclass
class RequestSpec:
    prompt: str
    output_len: int


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server to load")
    p.add_argument("--endpoint", default="/v1/completions",
                   choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--api-key", default=None, help="API key (default: $KVFLOW_API_KEY)")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (default: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="most requests in flight at once")
    p.add_argument("--input-len", type=int, default=128, help="mean prompt length in words")
    p.add_argument("--output-len", type=int, default=64, help="mean output length in tokens")
    p.add_argument("--range-ratio", type=float, default=0.5,
                   help="lengths are uniform in [len*(1-r), len*(1+r)]")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for exactly the output lengths (a vLLM extra; some servers refuse it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up request")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures here")


def build_workload(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                   seed: int) -> list[RequestSpec]:
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return max(1, rng.randint(int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))))

    specs = []
    for _ in range(num_prompts):
        n_words, start = length(input_len), rng.randrange(len(WORDS))
        words = [WORDS[(start + k) % len(WORDS)] for k in range(n_words)]
        specs.append(RequestSpec(" ".join(words), length(output_len)))
    return specs


def arrival_delays(num: int, rate: float, seed: int) -> list[float]:
    """Gaps between request arrivals: exponential (a Poisson process), or 0 for rate=inf."""
    if math.isinf(rate):
        return [0.0] * num
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    rng = random.Random(seed + 1)
    return [rng.expovariate(rate) for _ in range(num)]


async def iter_sse(response: Any) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of a server-sent-event stream, up to `data: [DONE]`."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _body(args: argparse.Namespace, model: str, spec: RequestSpec) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": spec.output_len, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    return body


async def send_request(client: Any, args: argparse.Namespace, model: str,
                       spec: RequestSpec) -> RequestResult:
    result = RequestResult()
    chunks, last = 0, 0.0
    start = time.perf_counter()
    try:
        async with client.stream("POST", args.endpoint, json=_body(args, model, spec)) as resp:
            if resp.status_code != 200:
                await resp.aread()
                result.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                return result
            async for event in iter_sse(resp):
                if "error" in event:
                    result.error = str(event["error"])
                    return result
                usage = event.get("usage") or {}
                result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
                result.output_tokens = usage.get("completion_tokens", result.output_tokens)
                for choice in event.get("choices") or []:
                    text = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if not text:
                        continue
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    chunks, last = chunks + 1, now
    except Exception as exc:  # a failed request is counted, never fatal to the run
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = chunks > 0
    if not result.ok:
        result.error = "no text received"
    return result


async def _resolve_model(client: Any, model: str | None) -> str:
    if model:
        return model
    response = await client.get("/v1/models")
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


async def run_benchmark(args: argparse.Namespace) -> tuple[list[RequestResult], float]:
    import httpx
    from tqdm import tqdm

    specs = build_workload(args.num_prompts, args.input_len, args.output_len,
                           args.range_ratio, args.seed)
    delays = arrival_delays(len(specs), args.request_rate, args.seed)
    key = args.api_key or os.environ.get("KVFLOW_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/"), headers=headers,
                                 timeout=httpx.Timeout(3600.0, connect=30.0),
                                 limits=limits) as client:
        model = await _resolve_model(client, args.model)
        if not args.no_warmup:
            warm = await send_request(client, args, model, RequestSpec(specs[0].prompt, 4))
            if not warm.ok:
                raise RuntimeError(f"the warm-up request failed: {warm.error}")
        gate = asyncio.Semaphore(args.max_concurrency or len(specs) or 1)
        bar = tqdm(total=len(specs), disable=args.disable_tqdm, desc="requests")

        async def one(spec: RequestSpec) -> RequestResult:
            async with gate:
                result = await send_request(client, args, model, spec)
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for spec, delay in zip(specs, delays, strict=True):
            await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(spec)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return list(results), duration


def _stats(values: list[float], prefix: str) -> dict[str, float]:
    arr = np.asarray(values, dtype=float) * 1000.0 if values else np.zeros(1)
    median = float(np.median(arr))
    return {f"mean_{prefix}_ms": float(arr.mean()), f"median_{prefix}_ms": median,
            f"p50_{prefix}_ms": median, f"p99_{prefix}_ms": float(np.percentile(arr, 99))}


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.prompt_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    summary: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": output_tokens / duration if duration else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration else 0.0,
    }
    summary |= _stats([r.ttft for r in ok], "ttft")
    summary |= _stats(tpots, "tpot")
    summary |= _stats([gap for r in ok for gap in r.itl], "itl")
    summary |= _stats([r.latency for r in ok], "e2el")
    errors = [r.error for r in results if not r.ok]
    if errors:
        summary["first_error"] = errors[0]
    return summary


def format_report(s: dict[str, Any]) -> str:
    lines = ["{:=^60}".format(" Serving Benchmark Result ")]

    def row(label: str, value: Any, fmt: str = "{:<10.2f}") -> None:
        lines.append(f"{label:<45}" + (fmt.format(value) if isinstance(value, float) else
                                        str(value)))

    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    row("Benchmark duration (s):", s["duration_s"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append("{:-^60}".format(f" {title} "))
        for stat, name in (("mean", "Mean"), ("median", "Median (p50)"), ("p99", "P99")):
            row(f"{name} {key.upper()} (ms):", s[f"{stat}_{key}_ms"])
    if "first_error" in s:
        lines.append(f"First error: {s['first_error']}")
    lines.append("=" * 60)
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    results, duration = asyncio.run(run_benchmark(args))
    summary = summarize(results, duration)
    summary.update(base_url=args.base_url, endpoint=args.endpoint, num_prompts=args.num_prompts,
                   request_rate=args.request_rate if not math.isinf(args.request_rate) else "inf",
                   max_concurrency=args.max_concurrency, seed=args.seed)
    print(format_report(summary), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary
