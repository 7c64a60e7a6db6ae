"""AsyncLLM overhead: the offline workload through AsyncLLM (DELTA streaming, all at once)
against LLM.generate on the same requests, in one invocation.

Prints both throughputs, their ratio, and the median time from a token's sampling (the end
of the core step that produced it) to its arrival in the consumer.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time

from common import make_workload, write_result

from kvflow import LLM, RequestOutputKind, SamplingParams
from kvflow.config import AsyncEngineArgs
from kvflow.engine.async_llm import AsyncLLM
from kvflow.model.registry import resolve_model


def run_offline(model: str, work, max_num_seqs: int) -> float:
    llm = LLM(model, max_num_seqs=max_num_seqs, disable_log_stats=True)
    llm.generate([{"prompt_token_ids": work[0][0]}], SamplingParams(max_tokens=4),
                 use_tqdm=False)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in work]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in work], params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


async def run_async(model: str, work, max_num_seqs: int) -> tuple[float, float]:
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=model, max_num_seqs=max_num_seqs, disable_log_stats=True))
    delays: list[float] = []

    async def one(i: int, prompt: list[int], n: int) -> int:
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
        count = 0
        async for out in engine.generate({"prompt_token_ids": prompt}, sp, f"r{i}"):
            if out.metrics is not None and out.metrics.last_token_time is not None:
                delays.append(time.time() - out.metrics.last_token_time)
            count += len(out.outputs[0].token_ids)
        return count

    try:
        await one(-1, work[0][0], 4)
        delays.clear()
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(work)))
        elapsed = time.perf_counter() - t0
    finally:
        engine.shutdown()
    return sum(counts) / elapsed, statistics.median(delays) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/results/async_overhead.json")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    path = resolve_model(args.model)
    work = make_workload(AutoTokenizer.from_pretrained(path), args.num_requests, args.seed)
    offline = run_offline(str(path), work, args.max_num_seqs)
    gc.collect()
    online, delay_ms = asyncio.run(run_async(str(path), work, args.max_num_seqs))
    write_result(args.json, {
        "benchmark": "async_overhead", "model": path.name, "requests": len(work),
        "llm_tok_s": round(offline, 1), "async_tok_s": round(online, 1),
        "ratio": round(online / offline, 3), "median_delivery_ms": round(delay_ms, 3),
    })
    print(f"async_overhead: AsyncLLM {online:.1f} tok/s vs LLM {offline:.1f} tok/s, "
          f"ratio {online / offline:.2f}; median sampling-to-consumer {delay_ms:.2f} ms")


if __name__ == "__main__":
    main()
