"""Speculative decoding: output tokens/s with speculation off, n-gram and a draft model.

Default model, greedy (outputs are the same in every configuration, so tokens/s compare
like for like), prefix caching off, one invocation: 1 stream (the prompts one after the
other) and 8 streams (8 requests at once), on two workloads:
- grounded: edit or summarize a given passage or piece of code (outputs copy the prompt);
- open: short open-ended instructions (nothing to copy).
Plus llama.cpp F32, one stream, on the grounded prompts: its own llama-server where
benchmarks/build_llama_server.sh built it, else llama-cpp-python where installed.
Ratios are each configuration over "off" in the same invocation (this machine is shared:
absolute figures drift, ratios much less); tokens/s counts each prompt's prefill, the
decode speed-up (`_tpot_x`) compares the median time per output token after the first.
Prints one result line; JSON in --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from common import write_result

ROOT = Path(__file__).resolve().parent.parent
GROUNDED = [
    ("Rewrite this Python code with the function `hash_block` renamed to `block_digest`. "
     "Output only the code.", ROOT / "kvflow/core/kv_cache.py", 1700, 900),
    ("Add a docstring to every function of this code and output the whole code.",
     ROOT / "kvflow/spec_decode/ngram.py", 520, 900),
    ("Correct the spelling in this text and output the corrected text.",
     ROOT / "README.md", 0, 900),
    ("Summarize this text, quoting its key sentences.", ROOT / "docs/architecture.md", 0, 900),
]
OPEN = ["Write a short story about a lighthouse keeper.",
        "Explain how a bicycle works to a child.",
        "Give me ten ideas for a birthday party.",
        "Describe the water cycle."]


def chat_prompts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                           add_generation_prompt=True, tokenize=False)
             for t in texts]
    return [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chats]


def grounded_texts() -> list[str]:
    out = []
    for instruction, path, start, length in GROUNDED:
        passage = path.read_text()[start:start + length]
        out.append(f"{instruction}\n\n{passage}")
    return out


def run_kvflow(spec: dict | None, prompts: list[list[int]], streams: int, max_tokens: int,
               threads: int | None) -> tuple[float, list[list[int]], float, float]:
    """tokens/s, the outputs, the mean acceptance length and the median time per output
    token after the first (ms) of one configuration."""
    from kvflow import LLM, SamplingParams

    llm = LLM(speculative_config=spec, enable_prefix_caching=False, disable_log_stats=True,
              num_threads=threads)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=4),
                 use_tqdm=False)  # warm-up
    work = [prompts[i % len(prompts)] for i in range(max(streams, len(prompts)))]
    outputs: list[list[int]] = []
    tpots: list[float] = []
    start = time.perf_counter()
    for first in range(0, len(work), streams):
        batch = [{"prompt_token_ids": p} for p in work[first:first + streams]]
        done = llm.generate(batch, params, use_tqdm=False)
        outputs += [list(o.outputs[0].token_ids) for o in done]
        for o in done:
            m, n = o.metrics, len(o.outputs[0].token_ids)
            if m and m.first_token_time and m.last_token_time and n > 1:
                tpots.append((m.last_token_time - m.first_token_time) / (n - 1))
    elapsed = time.perf_counter() - start
    stats = llm.llm_engine.core.get_stats()
    mean_len = 1 + stats.spec_num_accepted_tokens / max(stats.spec_num_drafts, 1)
    del llm
    return sum(map(len, outputs)) / elapsed, outputs, mean_len, statistics.median(tpots) * 1e3


def run_llamacpp(prompts: list[list[int]], max_tokens: int,
                 threads: int | None) -> tuple[float, list[list[int]]] | str:
    """llama.cpp F32, one stream: its own server where benchmarks/build_llama_server.sh built
    it, else llama-cpp-python; the tokens/s and the outputs, or why it was skipped."""
    import os

    import llamacpp

    threads = threads or os.cpu_count() or 1
    binary = llamacpp.llama_server_binary()
    if binary is not None:
        log = Path("benchmarks/results/speculative-llama-server.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        return llamacpp.server_single_stream(binary, llamacpp.default_model_as("F32"), prompts,
                                             max_tokens, threads, log)
    if not llamacpp.available():
        return ("skipped: neither llama-server (benchmarks/build_llama_server.sh) nor "
                "llama_cpp (pip install 'kvflow[bench]') is installed")
    engine = llamacpp.LlamaCpp(llamacpp.default_model_as("F32"), seq_len=4096, threads=threads)
    try:
        outputs, elapsed = [], 0.0
        for prompt in prompts:
            start = time.perf_counter()
            ids, _ = engine.generate(prompt, max_tokens)
            elapsed += time.perf_counter() - start
            outputs.append(list(ids))
        return sum(map(len, outputs)) / elapsed, outputs
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="output tokens a request (an edit copies its ~300-token passage)")
    parser.add_argument("--k", type=int, default=5, help="num_speculative_tokens")
    parser.add_argument("--draft", default="default",
                        help="draft model folder ('default': the default model itself, "
                             "int8; 'none': no draft_model run)")
    parser.add_argument("--draft-quantization", default=None,
                        help="the draft's quantization (default: int8 for --draft default)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--workloads", default="grounded,open")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per workload")
    parser.add_argument("--json", default="benchmarks/results/speculative.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from kvflow.model.registry import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    texts = {"grounded": grounded_texts(), "open": OPEN}
    workloads = {name: chat_prompts(tokenizer, texts[name][:args.prompts])
                 for name in args.workloads.split(",")}
    configs: dict[str, dict | None] = {
        "off": None,
        "ngram": {"method": "ngram", "num_speculative_tokens": args.k,
                  "prompt_lookup_min": 2, "prompt_lookup_max": 5},
    }
    if args.draft != "none":
        draft = str(resolve_model(None)) if args.draft == "default" else args.draft
        quantization = args.draft_quantization or ("int8" if args.draft == "default" else None)
        configs["draft"] = {"method": "draft_model", "model": draft,
                            "num_speculative_tokens": args.k, "quantization": quantization}
    result: dict[str, Any] = {"max_tokens": args.max_tokens, "k": args.k,
                              "configs": configs}
    grounded_off: list[list[int]] = []
    for workload, prompts in workloads.items():
        for streams in map(int, args.streams.split(",")):
            base_outputs = None
            for name, spec in configs.items():
                rate, outputs, mean_len, tpot = run_kvflow(spec, prompts, streams,
                                                           args.max_tokens, args.threads)
                key = f"{workload}_{streams}_{name}"
                result[f"{key}_tok_s"] = round(rate, 2)
                result[f"{key}_tpot_ms"] = round(tpot, 2)
                if name == "off":
                    base_outputs, base, base_tpot = outputs, rate, tpot
                    if (workload, streams) == ("grounded", 1):
                        grounded_off = outputs
                    continue
                result[f"{key}_x"] = round(rate / base, 2)
                result[f"{key}_tpot_x"] = round(base_tpot / tpot, 2)  # decode speed-up
                result[f"{key}_mean_accept_len"] = round(mean_len, 2)
                result[f"{key}_same_outputs"] = sum(
                    a == b for a, b in zip(outputs, base_outputs or [], strict=True))
                print(key, result[f"{key}_tok_s"], "tok/s", result[f"{key}_x"], "x, decode",
                      result[f"{key}_tpot_x"], "x", flush=True)
    llama = run_llamacpp(workloads["grounded"], args.max_tokens, args.threads) \
        if grounded_off else "skipped: no grounded workload at one stream"
    if isinstance(llama, str):
        result["llamacpp_f32_grounded_1_tok_s"] = llama
    else:
        result["llamacpp_f32_grounded_1_tok_s"] = round(llama[0], 2)
        result["llamacpp_f32_grounded_1_same_outputs"] = sum(
            a == b[:len(a)] for a, b in zip(llama[1], grounded_off, strict=False))
        for name in configs:
            key = f"grounded_1_{name}_tok_s"
            if key in result:
                result[f"grounded_1_{name}_over_llamacpp"] = round(result[key] / llama[0], 2)
    write_result(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k.endswith(("_x", "_tok_s"))}))


if __name__ == "__main__":
    main()
