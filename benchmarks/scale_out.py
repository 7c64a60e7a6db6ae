"""Scale-out, one invocation: (a) tensor parallel, (b) data-parallel routing.

(a) TP=2 against TP=1 on the default model, same total threads (benchmarks/scale_out_tp.py,
    `run_part_a`): throughput ratio and communication per step.
(b) 40 conversations x 8 turns of multi-turn chat with 128-token replies (each turn resends
    the whole history, prefix_cache.py's workload), each turn's requests arriving in random
    order, `--wave` at a time. Three engines, same total KV cache: one engine core, and 2
    replicas with prefix-aware routing and with round-robin routing. Each replica's cache holds
    `--replica-cache-fraction` (half) of the last turn's histories: the two together hold
    them all, as the single core does, but one replica cannot hold every conversation.
    Prints the prefix-cache hit rate and the median
    time to first token of turns 2..N of each, and the ratios.
    Targets: prefix-aware >= 1.5x round-robin's hit rate and >= 0.9x the single core's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import time
from typing import Any

from common import cpu_isa_line, write_result
from prefix_cache import Histories, distinct_blocks, new_histories, turn_prompts
from scale_out_tp import add_arguments, run_part_a

from kvflow import SamplingParams
from kvflow.config import AsyncEngineArgs, EngineArgs
from kvflow.engine.async_llm import AsyncLLM
from kvflow.engine.processor import load_tokenizer


def working_set_blocks(args: argparse.Namespace) -> tuple[int, int]:
    """Distinct blocks of the last turn's histories (replies stood in by reply_tokens words),
    and the longest prompt's blocks plus its reply."""
    tokenizer = load_tokenizer(EngineArgs().create_engine_config().model_config)
    histories = new_histories(args.conversations)
    for turn in range(args.turns - 1):
        turn_prompts(tokenizer, histories, turn)
        for h in histories:
            h.append({"role": "assistant", "content": " word" * args.reply_tokens})
    prompts = turn_prompts(tokenizer, histories, args.turns - 1)
    longest = max(len(p["prompt_token_ids"]) for p in prompts) + args.reply_tokens
    return distinct_blocks(prompts, args.block_size), -(-longest // args.block_size)


async def chat(engine: AsyncLLM, args: argparse.Namespace) -> list[float]:
    """Every conversation's turns, each turn's requests in a shuffled order, `wave` at a time;
    the TTFTs of turns 2..N."""
    tokenizer = engine.get_tokenizer()
    rng = random.Random(args.seed)
    histories: Histories = new_histories(args.conversations)
    params = SamplingParams(max_tokens=args.reply_tokens, temperature=0.0, ignore_eos=True)
    ttfts: list[float] = []
    for turn in range(args.turns):
        order = list(range(args.conversations))
        rng.shuffle(order)  # users answer at different times
        for start in range(0, len(order), args.wave):
            wave = order[start:start + args.wave]
            prompts = turn_prompts(tokenizer, [histories[c] for c in wave], turn)
            outs = await asyncio.gather(*(
                final_output(engine, prompt, params, f"c{c}-t{turn}")
                for c, prompt in zip(wave, prompts, strict=True)))
            for c, out in zip(wave, outs, strict=True):
                histories[c].append({"role": "assistant", "content": out.outputs[0].text})
                m = out.metrics
                if turn > 0 and m is not None and m.first_token_time is not None:
                    ttfts.append(m.first_token_time - m.arrival_time)
        print(f"  turn {turn + 1}/{args.turns} done", file=sys.stderr, flush=True)
    return ttfts


async def final_output(engine: AsyncLLM, prompt: Any, params: SamplingParams,
                       request_id: str) -> Any:
    last = None
    async for out in engine.generate(prompt, params, request_id):
        last = out
    return last


async def run_engine(args: argparse.Namespace, blocks: int, replicas: int,
                     routing: str) -> dict[str, float]:
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        num_kv_blocks=blocks, block_size=args.block_size, max_num_seqs=args.wave,
        data_parallel_size=replicas, data_parallel_routing=routing, disable_log_stats=True))
    try:
        await final_output(engine, "In the beginning the river ran " * 4,  # warm-up
                           SamplingParams(max_tokens=2, temperature=0.0), "warm-up")
        await engine.reset_prefix_cache()
        before = await engine.get_scheduler_stats()
        t0 = time.perf_counter()
        ttfts = await chat(engine, args)
        elapsed = time.perf_counter() - t0
        after = await engine.get_scheduler_stats()
        routed = engine.engine_core.routed_counts()
    finally:
        engine.shutdown()
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    return {"hit_rate": hits / queries, "median_ttft_s": statistics.median(ttfts),
            "seconds": elapsed, "routed": routed}  # type: ignore[dict-item]


def part_b(args: argparse.Namespace) -> dict[str, Any]:
    working, longest = working_set_blocks(args)
    per_replica = max(int(working * args.replica_cache_fraction), args.wave * longest)
    single = asyncio.run(run_engine(args, 2 * per_replica, 1, "round_robin"))
    gc.collect()
    aware = asyncio.run(run_engine(args, per_replica, 2, "prefix_aware"))
    gc.collect()
    rr = asyncio.run(run_engine(args, per_replica, 2, "round_robin"))
    vs_rr, vs_single = aware["hit_rate"] / rr["hit_rate"], aware["hit_rate"] / single["hit_rate"]
    result = {
        "benchmark": "scale_out_data_parallel", "conversations": args.conversations,
        "turns": args.turns, "wave": args.wave, "reply_tokens": args.reply_tokens,
        "working_set_blocks": working, "replica_blocks": per_replica,
        "single": single, "prefix_aware": aware, "round_robin": rr,
        "hit_rate_vs_round_robin": round(vs_rr, 2), "hit_rate_vs_single": round(vs_single, 2),
    }
    print(f"scale_out (b): {args.conversations}x{args.turns} turns, 2 replicas of {per_replica} "
          f"blocks ({args.replica_cache_fraction:.0%} of the {working}-block histories) vs one "
          f"core of {2 * per_replica}: prefix hit rate prefix-aware "
          f"{aware['hit_rate']:.1%}, round-robin {rr['hit_rate']:.1%}, single "
          f"{single['hit_rate']:.1%}: {vs_rr:.2f}x round-robin (target 1.5x), {vs_single:.2f}x "
          f"single (target 0.9x); median TTFT turns 2-{args.turns}: "
          f"{aware['median_ttft_s'] * 1000:.0f} / {rr['median_ttft_s'] * 1000:.0f} / "
          f"{single['median_ttft_s'] * 1000:.0f} ms; routed {aware['routed']} vs "
          f"{rr['routed']} | {cpu_isa_line()} | {time.strftime('%Y-%m-%d')}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["a", "b", "all"], default="all")
    parser.add_argument("--conversations", type=int, default=40)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--reply-tokens", type=int, default=128)
    parser.add_argument("--wave", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--replica-cache-fraction", type=float, default=0.5,
                        help="each replica's KV blocks over the last turn's history blocks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/results/scale_out.json")
    add_arguments(parser)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    if args.part in ("a", "all"):
        results["tensor_parallel"] = run_part_a(args)
    if args.part in ("b", "all"):
        results["data_parallel"] = part_b(args)
    write_result(args.json, {"benchmark": "scale_out", **results})


if __name__ == "__main__":
    main()
