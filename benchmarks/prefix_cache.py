"""Prefix caching on a chat workload: 10 conversations x 8 turns, each turn resending the
whole history, with caching on and off in one invocation. Prints throughput and mean time to
first token of each, and the ratios.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from common import write_result

from kvflow import LLM, SamplingParams

SYSTEM = ("You are a helpful assistant for a travel agency. You answer questions about "
          "destinations, weather, local food, transport and museums. Keep answers short, "
          "friendly and precise, and always mention one practical tip. ") * 3
QUESTIONS = ["Where should I go in spring?", "What food should I try there?",
             "How do I get around?", "Which museum is a must?", "Is it expensive?",
             "What is the weather like?", "Any tips for a day trip?", "What should I pack?"]


def run(caching: bool, conversations: int, turns: int, reply_tokens: int) -> tuple[float, float]:
    llm = LLM(None, enable_prefix_caching=caching, disable_log_stats=True)
    tokenizer = llm.get_tokenizer()
    histories = [[{"role": "system", "content": SYSTEM + f" Customer number {c}."}]
                 for c in range(conversations)]
    params = SamplingParams(max_tokens=reply_tokens, temperature=0.0, ignore_eos=True)
    ttfts: list[float] = []
    generated = 0
    t0 = time.perf_counter()
    for turn in range(turns):
        for h in histories:
            h.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        texts = [tokenizer.apply_chat_template(h, add_generation_prompt=True, tokenize=False)
                 for h in histories]
        prompts = [{"prompt_token_ids": tokenizer(t, add_special_tokens=False)["input_ids"]}
                   for t in texts]
        outs = llm.generate(prompts, params, use_tqdm=False)
        for h, out in zip(histories, outs, strict=True):
            h.append({"role": "assistant", "content": out.outputs[0].text})
            generated += len(out.outputs[0].token_ids)
            m = out.metrics
            if m is not None and m.first_token_time is not None:
                ttfts.append(m.first_token_time - m.arrival_time)
    elapsed = time.perf_counter() - t0
    return generated / elapsed, statistics.mean(ttfts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conversations", type=int, default=10)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--json", default="benchmarks/results/prefix_cache.json")
    args = parser.parse_args()
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
