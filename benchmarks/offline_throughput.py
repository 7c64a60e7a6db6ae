"""Offline throughput: kvflow's LLM.generate against transformers and llama.cpp.

64 requests (fixed seed), prompt lengths 16-512, output lengths 16-256 with ignore_eos,
default model, greedy, float32. In this invocation, on the same requests:
- transformers `generate` in padded static batches (tokens past a request's length are waste),
- transformers continuous batching (the engine behind `generate_batch`),
- llama.cpp (llama-cpp-python, `bench` extra) batching up to --max-num-seqs sequences per
  llama_decode on the default model's GGUF re-encoded as F32,
and the roofline (matmul GFLOP/s, bandwidth) measured in the same run. The share of the
compute roofline compares kvflow's output tokens/s with what the measured matmul speed
allows for this workload's linear-layer FLOPs (its prompts included; see roofline.py).

With --device cuda (bfloat16 unless --dtype says otherwise) the same workload runs on the
GPU against transformers on the GPU; llama.cpp and the CPU roofline are left out.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import make_workload, write_result


def run_kvflow(model: str | None, work, max_num_seqs: int, device: str, dtype: str) -> float:
    from kvflow import LLM, SamplingParams

    llm = LLM(model, max_num_seqs=max_num_seqs, kv_cache_memory_gb=2.0, disable_log_stats=True,
              device=device, dtype=dtype)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-hf-continuous", action="store_true",
                        help="run transformers' static batches only (its CB takes ~10 min)")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/offline_throughput.json")
    args = parser.parse_args()

    import hf_baselines
    import llamacpp
    import roofline
    from transformers import AutoConfig, AutoTokenizer

    from kvflow.model.registry import resolve_model

    torch.set_num_threads(2)
    path = resolve_model(args.model)
    work = make_workload(AutoTokenizer.from_pretrained(path), args.num_requests, args.seed)
    on_cpu = args.device == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    rates = {"kvflow": run_kvflow(str(path), work, args.max_num_seqs, args.device, dtype)}
    if not args.skip_hf:
        hf = dict(device=args.device, dtype=getattr(torch, dtype))
        rates["hf_static"] = hf_baselines.static_batches(path, work, args.hf_batch_size, **hf)
        if not args.skip_hf_continuous:
            rates["hf_continuous"] = hf_baselines.continuous_batching(path, work, **hf)
    if on_cpu and not args.skip_llamacpp and llamacpp.available() and args.model is None:
        longest = max(len(p) + n for p, n in work)
        engine = llamacpp.LlamaCpp(llamacpp.default_model_as("F32"),
                                   max_seqs=args.max_num_seqs, seq_len=longest)
        rates["llamacpp_batched"] = engine.batched(work)
        engine.close()
    ours = rates["kvflow"]
    result = {
        "benchmark": "offline_throughput", "model": path.name, "requests": len(work),
        "device": args.device, "dtype": dtype, "output_tokens": sum(n for _, n in work),
        "tok_s": {k: round(v, 1) for k, v in rates.items()},
        "ratios": {f"vs_{k}": round(ours / v, 2) for k, v in rates.items() if k != "kvflow"},
    }
    limit_text = ""
    if on_cpu:
        limits = roofline.measure(path)
        bound = roofline.workload_bound_output_tok_s(limits, AutoConfig.from_pretrained(path),
                                                     work)
        processed = ours * roofline.token_passes(work) / sum(n for _, n in work)
        result["roofline"] = limits
        result["workload_bound_output_tok_s"] = round(bound, 1)
        result["share_of_compute_roofline"] = round(ours / bound, 2)
        # Output tokens/s over the all-tokens rate: what sessions 3-4 reported; it leaves
        # out the prompt tokens, two thirds of this workload's forward passes.
        result["output_rate_over_all_token_rate"] = round(ours / limits["compute_bound_tok_s"], 2)
        limit_text = (f"{result['share_of_compute_roofline']:.0%} of the compute roofline "
                      f"(workload bound {bound:.1f} output tok/s; {processed:.0f} tokens "
                      f"processed/s; {roofline.describe(limits)}); ")
    else:
        result["gpu"] = torch.cuda.get_device_name()
    write_result(args.json, result)
    parts = ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
    print(f"offline_throughput: output tok/s {parts}; ratios {result['ratios']}; {limit_text}"
          f"{len(work)} requests, {path.name}, {args.device} {dtype}")


if __name__ == "__main__":
    main()
