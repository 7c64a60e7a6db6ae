"""Prefix caching on a chat workload: 10 conversations x 8 turns, each turn resending the
whole history, with caching on and off in one invocation. Prints throughput and mean time to
first token of each, and the ratios.

`--second-tier` (issue 19): 40 conversations x 8 turns whose histories are ~4x the first tier
(num_kv_blocks), sent in waves of `--wave` requests so a conversation's blocks are evicted
before its next turn; the second KV tier (host memory) off vs on, median TTFT of turns 2..N.
Then a restart: an engine with a disk tier runs turns 1..N-1 and spills its prefix cache
(sleep(1)); the next turn runs on a fresh engine over that folder (warm) and over an empty one
(cold), with identical prompts.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from typing import Any

from common import cpu_isa_line, write_result

from kvflow import LLM, SamplingParams
from kvflow.config import EngineArgs
from kvflow.engine.processor import load_tokenizer

SYSTEM = ("You are a helpful assistant for a travel agency. You answer questions about "
          "destinations, weather, local food, transport and museums. Keep answers short, "
          "friendly and precise, and always mention one practical tip. ") * 3
QUESTIONS = ["Where should I go in spring?", "What food should I try there?",
             "How do I get around?", "Which museum is a must?", "Is it expensive?",
             "What is the weather like?", "Any tips for a day trip?", "What should I pack?"]
Histories = list[list[dict[str, str]]]


def new_histories(conversations: int) -> Histories:
    return [[{"role": "system", "content": SYSTEM + f" Customer number {c}."}]
            for c in range(conversations)]


def turn_prompts(tokenizer: Any, histories: Histories, turn: int) -> list[dict[str, list[int]]]:
    """Append this turn's question to every history; the whole histories as token prompts."""
    for h in histories:
        h.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
    texts = [tokenizer.apply_chat_template(h, add_generation_prompt=True, tokenize=False)
             for h in histories]
    return [{"prompt_token_ids": tokenizer(t, add_special_tokens=False)["input_ids"]}
            for t in texts]


def run(caching: bool, conversations: int, turns: int, reply_tokens: int) -> tuple[float, float]:
    llm = LLM(None, enable_prefix_caching=caching, disable_log_stats=True)
    tokenizer = llm.get_tokenizer()
    histories = new_histories(conversations)
    params = SamplingParams(max_tokens=reply_tokens, temperature=0.0, ignore_eos=True)
    ttfts: list[float] = []
    generated = 0
    t0 = time.perf_counter()
    for turn in range(turns):
        prompts = turn_prompts(tokenizer, histories, turn)
        outs = llm.generate(prompts, params, use_tqdm=False)
        for h, out in zip(histories, outs, strict=True):
            h.append({"role": "assistant", "content": out.outputs[0].text})
            generated += len(out.outputs[0].token_ids)
            m = out.metrics
            if m is not None and m.first_token_time is not None:
                ttfts.append(m.first_token_time - m.arrival_time)
    elapsed = time.perf_counter() - t0
    return generated / elapsed, statistics.mean(ttfts)


# ---- the second KV tier (--second-tier) ------------------------------------------------
def distinct_blocks(prompts: list[dict[str, list[int]]], block_size: int) -> int:
    """Full blocks of these prompts, a shared prefix (the system prompt) counted once."""
    seen = set()
    for p in prompts:
        ids = p["prompt_token_ids"]
        seen.update(hash(tuple(ids[:end])) for end in range(block_size, len(ids) + 1, block_size))
    return len(seen)


def first_tier_size(args: argparse.Namespace) -> int:
    """1/history_ratio of the last turn's histories (replies stood in by reply_tokens words),
    but at least what one wave of the longest prompts needs."""
    tokenizer = load_tokenizer(EngineArgs().create_engine_config().model_config)
    histories = new_histories(args.conversations)
    for turn in range(args.turns - 1):
        turn_prompts(tokenizer, histories, turn)
        for h in histories:
            h.append({"role": "assistant", "content": " word" * args.reply_tokens})
    prompts = turn_prompts(tokenizer, histories, args.turns - 1)
    bs = args.block_size
    longest = max(len(p["prompt_token_ids"]) for p in prompts) + args.reply_tokens
    return max(distinct_blocks(prompts, bs) // args.history_ratio, args.wave * -(-longest // bs))


def tier_llm(args: argparse.Namespace, blocks: int, offload: bool, **kw: Any) -> LLM:
    llm = LLM(None, num_kv_blocks=blocks, block_size=args.block_size, max_num_seqs=args.wave,
              kv_offloading_size=args.host_gib if offload else None, disable_log_stats=True, **kw)
    llm.generate("In the beginning the river ran through the valley " * 6,  # warm-up
                 SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)
    return llm


def blocks_loaded(llm: LLM) -> int:
    return llm.llm_engine.core.get_stats().kv_offload_blocks_loaded


def chat_turns(llm: LLM, histories: Histories, turns: range,
               args: argparse.Namespace) -> tuple[list[list[float]], int]:
    """Run these turns of every conversation in waves; TTFTs per turn, tokens generated."""
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(max_tokens=args.reply_tokens, temperature=0.0, ignore_eos=True)
    ttfts: list[list[float]] = []
    generated = 0
    for turn in turns:
        prompts = turn_prompts(tokenizer, histories, turn)
        outs = [o for i in range(0, len(prompts), args.wave)
                for o in llm.generate(prompts[i:i + args.wave], params, use_tqdm=False)]
        ttfts.append([])
        for h, out in zip(histories, outs, strict=True):
            h.append({"role": "assistant", "content": out.outputs[0].text})
            generated += len(out.outputs[0].token_ids)
            m = out.metrics
            assert m is not None and m.first_token_time is not None
            ttfts[-1].append(m.first_token_time - m.arrival_time)
    return ttfts, generated


def tier_run(args: argparse.Namespace, blocks: int, offload: bool) -> tuple[float, float, int]:
    """Tokens/s, median TTFT of turns 2..N, blocks loaded from the second tier."""
    llm = tier_llm(args, blocks, offload)
    t0 = time.perf_counter()
    ttfts, generated = chat_turns(llm, new_histories(args.conversations), range(args.turns),
                                  args)
    elapsed = time.perf_counter() - t0
    loaded = blocks_loaded(llm)
    del llm
    gc.collect()
    return generated / elapsed, statistics.median(t for turn in ttfts[1:] for t in turn), loaded


def restart_run(args: argparse.Namespace, blocks: int) -> tuple[float, float, int, int]:
    """Median TTFT of turn N on a fresh engine: cold (an empty folder) and warm (the folder
    of an engine that ran turns 1..N-1); blocks loaded warm; distinct blocks of turn N."""
    with tempfile.TemporaryDirectory() as warm_dir, tempfile.TemporaryDirectory() as cold_dir:
        llm = tier_llm(args, blocks, True, kv_offloading_path=warm_dir, enable_sleep_mode=True)
        histories = new_histories(args.conversations)
        chat_turns(llm, histories, range(args.turns - 1), args)
        history_blocks = distinct_blocks(
            turn_prompts(llm.get_tokenizer(), [list(h) for h in histories], args.turns - 1),
            args.block_size)
        llm.sleep(1)  # spills the first tier's prefix blocks too; disk writes flushed
        del llm
        gc.collect()
        medians, loaded = [], 0
        for folder in (cold_dir, warm_dir):
            llm = tier_llm(args, blocks, True, kv_offloading_path=folder)
            before = blocks_loaded(llm)
            same = [list(h) for h in histories]  # identical prompts, cold and warm
            ttfts, _ = chat_turns(llm, same, range(args.turns - 1, args.turns), args)
            medians.append(statistics.median(ttfts[0]))
            loaded = blocks_loaded(llm) - before
            del llm
            gc.collect()
    return medians[0], medians[1], loaded, history_blocks


def second_tier(args: argparse.Namespace) -> None:
    blocks = first_tier_size(args)
    off_tps, off_ttft, _ = tier_run(args, blocks, False)
    on_tps, on_ttft, on_loaded = tier_run(args, blocks, True)
    cold_ttft, warm_ttft, warm_loaded, history_blocks = restart_run(args, blocks)
    ratio, tier_x, restart_x = history_blocks / blocks, off_ttft / on_ttft, cold_ttft / warm_ttft
    write_result(args.json, {
        "benchmark": "prefix_cache_second_tier", "conversations": args.conversations,
        "turns": args.turns, "wave": args.wave, "first_tier_blocks": blocks,
        "history_blocks": history_blocks, "host_gib": args.host_gib,
        "off_tok_s": round(off_tps, 1), "on_tok_s": round(on_tps, 1),
        "off_median_ttft_s": round(off_ttft, 3), "on_median_ttft_s": round(on_ttft, 3),
        "ttft_ratio": round(tier_x, 2), "tier_blocks_loaded": on_loaded,
        "cold_ttft_s": round(cold_ttft, 3), "warm_ttft_s": round(warm_ttft, 3),
        "restart_ratio": round(restart_x, 2), "warm_blocks_loaded": warm_loaded,
    })
    print(f"prefix_cache --second-tier: {args.conversations}x{args.turns} turns, histories "
          f"{ratio:.1f}x a {blocks}-block first tier: median TTFT turns 2-{args.turns} off "
          f"{off_ttft * 1000:.0f} ms, on {on_ttft * 1000:.0f} ms: {tier_x:.2f}x (target 3x), "
          f"{off_tps:.1f} -> {on_tps:.1f} tok/s, {on_loaded} blocks loaded; restart turn "
          f"{args.turns}: cold {cold_ttft * 1000:.0f} ms, warm {warm_ttft * 1000:.0f} ms: "
          f"{restart_x:.2f}x (target 5x), {warm_loaded} blocks from disk | {cpu_isa_line()} | "
          f"{time.strftime('%Y-%m-%d')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, help="default 10; 40 with --second-tier")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--json", help="default benchmarks/results/prefix_cache[_second_tier]"
                        ".json")
    parser.add_argument("--second-tier", action="store_true", help="the second KV tier case")
    parser.add_argument("--wave", type=int, default=8, help="requests per generate call and "
                        "max_num_seqs (--second-tier)")
    parser.add_argument("--history-ratio", type=int, default=4,
                        help="histories over first tier (--second-tier)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--host-gib", type=float, default=2.0, help="kv_offloading_size")
    args = parser.parse_args()
    if args.second_tier:
        args.conversations = args.conversations or 40
        args.json = args.json or "benchmarks/results/prefix_cache_second_tier.json"
        second_tier(args)
        return
    args.conversations = args.conversations or 10
    args.json = args.json or "benchmarks/results/prefix_cache.json"
    off_tps, off_ttft = run(False, args.conversations, args.turns, args.reply_tokens)
    gc.collect()
    on_tps, on_ttft = run(True, args.conversations, args.turns, args.reply_tokens)
    write_result(args.json, {
        "benchmark": "prefix_cache", "conversations": args.conversations, "turns": args.turns,
        "on_tok_s": round(on_tps, 1), "off_tok_s": round(off_tps, 1),
        "on_ttft_s": round(on_ttft, 3), "off_ttft_s": round(off_ttft, 3),
        "throughput_ratio": round(on_tps / off_tps, 2), "ttft_ratio": round(off_ttft / on_ttft, 2),
    })
    print(f"prefix_cache: on {on_tps:.1f} tok/s (TTFT {on_ttft * 1000:.0f} ms), off {off_tps:.1f} "
          f"tok/s (TTFT {off_ttft * 1000:.0f} ms): {on_tps / off_tps:.2f}x throughput, "
          f"{off_ttft / on_ttft:.2f}x faster first token")


if __name__ == "__main__":
    main()
