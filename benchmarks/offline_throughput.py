"""Offline throughput: kvflow's LLM.generate vs transformers' padded static batches.

64 requests (fixed seed), prompt lengths 16-512, output lengths 16-256 with ignore_eos,
default model, greedy. Both run in this invocation on the same requests; the result line
gives output tokens/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import make_workload, write_result


def run_kvflow(model: str | None, work, max_num_seqs: int) -> float:
    from kvflow import LLM, SamplingParams

    llm = LLM(model, max_num_seqs=max_num_seqs, kv_cache_memory_gb=2.0, disable_log_stats=True)
    warm = [SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)]
    llm.generate([{"prompt_token_ids": work[0][0]}], warm, use_tqdm=False)
    prompts = [{"prompt_token_ids": ids} for ids, _ in work]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in work]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == sum(n for _, n in work)
    return produced / elapsed


def run_transformers(path: Path, work, batch_size: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pad = 0
    t0 = time.perf_counter()
    useful = 0
    with torch.inference_mode():
        for b in range(0, len(work), batch_size):
            batch = work[b:b + batch_size]
            longest = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([[pad] * (longest - len(p)) + p for p, _ in batch])
            mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p, _ in batch])
            max_new = max(n for _, n in batch)
            model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                           do_sample=False, pad_token_id=pad)
            useful += sum(n for _, n in batch)  # tokens past a request's own length are waste
    return useful / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/offline_throughput.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from kvflow.model.registry import resolve_model

    path = resolve_model(args.model)
    work = make_workload(AutoTokenizer.from_pretrained(path), args.num_requests, args.seed)
    ours = run_kvflow(str(path), work, args.max_num_seqs)
    hf = None if args.skip_hf else run_transformers(path, work, args.hf_batch_size)
    result = {
        "benchmark": "offline_throughput", "model": path.name, "requests": len(work),
        "kvflow_tok_s": round(ours, 1), "hf_static_tok_s": hf and round(hf, 1),
        "ratio_vs_hf_static": hf and round(ours / hf, 2),
    }
    write_result(args.json, result)
    hf_part = f"hf static {hf:.1f} tok/s, ratio {ours / hf:.2f}x" if hf else "hf skipped"
    print(f"offline_throughput: kvflow {ours:.1f} output tok/s, {hf_part} "
          f"({len(work)} requests, {path.name})")


if __name__ == "__main__":
    main()
