"""Offline throughput: kvflow's LLM.generate against transformers and llama.cpp.

64 requests (fixed seed), prompt lengths 16-512, output lengths 16-256 with ignore_eos,
default model, greedy. On the CPU kvflow runs twice, in float32 and in bfloat16 (both named,
not "auto"; --dtype keeps one). In this invocation, on the same requests:
- transformers `generate` in padded static batches (tokens past a request's length are
  waste), in float32 and in bfloat16 (--skip-hf-bf16: float32 only; transformers' bf16 is
  slow on CPUs without bf16 arithmetic),
- transformers continuous batching (the engine behind `generate_batch`), float32,
- llama.cpp (llama-cpp-python, `bench` extra) batching up to --max-num-seqs sequences per
  llama_decode on the default model's GGUF re-encoded as F32,
and the roofline (matmul GFLOP/s in float32 and bf16, bandwidth) measured in the same run.
The share of the compute roofline compares each kvflow run's output tokens/s with what the
measured matmul speed for its dtype allows for this workload's linear-layer FLOPs (its
prompts included; see roofline.py).

Keys: the first dtype's figures keep the names of older results ("kvflow", "hf_static",
"vs_hf_static", "share_of_compute_roofline"); the bf16 run's carry "_bf16" ("kvflow_bf16",
"bf16_vs_kvflow" = bf16 over float32, "bf16_vs_hf_static", "bf16_vs_hf_static_bf16").

With --device cuda (bfloat16 unless --dtype says otherwise) the same workload runs on the
GPU against transformers on the GPU; llama.cpp and the CPU roofline are left out.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any

import torch
from common import cpu_isa_line, make_workload, write_result

SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
Work = list[tuple[list[int], int]]  # (prompt token ids, output tokens)


def run_kvflow(model: str | None, work: Work, max_num_seqs: int, device: str, dtype: str,
               **engine: Any) -> float:
    """Output tokens/s; `engine` holds further EngineArgs (attention_backend, enforce_eager)."""
    from kvflow import LLM, SamplingParams

    llm = LLM(model, max_num_seqs=max_num_seqs, kv_cache_memory_gb=2.0, disable_log_stats=True,
              device=device, dtype=dtype, **engine)
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


def key(name: str, dtype: str, primary: str) -> str:
    """A figure's name: the first dtype's keeps the name older results use."""
    return name if dtype == primary else f"{name}_{SHORT[dtype]}"


def run_baselines(args: argparse.Namespace, path: Path, work: Work, dtypes: list[str]
                  ) -> dict[str, float]:
    """Output tokens/s of transformers (in each dtype) and llama.cpp on the same work."""
    import hf_baselines
    import llamacpp

    rates: dict[str, float] = {}
    if not args.skip_hf:
        for dtype in [d for d in dtypes if not (args.skip_hf_bf16 and d == "bfloat16")]:
            rates[key("hf_static", dtype, dtypes[0])] = hf_baselines.static_batches(
                path, work, args.hf_batch_size, device=args.device, dtype=getattr(torch, dtype))
        if not args.skip_hf_continuous:
            rates["hf_continuous"] = hf_baselines.continuous_batching(
                path, work, device=args.device, dtype=getattr(torch, dtypes[0]))
    if (args.device == "cpu" and not args.skip_llamacpp and llamacpp.available()
            and args.model is None):
        longest = max(len(p) + n for p, n in work)
        engine = llamacpp.LlamaCpp(llamacpp.default_model_as("F32"),
                                   max_seqs=args.max_num_seqs, seq_len=longest)
        rates["llamacpp_batched"] = engine.batched(work)
        engine.close()
    return rates


def ratios(rates: dict[str, float], dtypes: list[str]) -> dict[str, float]:
    """The first dtype's kvflow run over every baseline (names as in older results); each
    later dtype's run over every other figure, the first dtype's kvflow run included."""
    first = rates["kvflow"]
    out = {f"vs_{k}": round(first / v, 2) for k, v in rates.items()
           if not k.startswith("kvflow") or k == "kvflow_eager"}
    for dtype in dtypes[1:]:
        name = key("kvflow", dtype, dtypes[0])
        out.update({f"{SHORT[dtype]}_vs_{k}": round(rates[name] / v, 2)
                    for k, v in rates.items() if k != name})
    return out


def roofline_figures(path: Path, work: Work, rates: dict[str, float], dtypes: list[str]
                     ) -> tuple[dict[str, Any], str]:
    """The run's roofline, and each kvflow run's share of its dtype's workload bound."""
    import roofline
    from transformers import AutoConfig

    limits = roofline.measure(path)
    config = AutoConfig.from_pretrained(path)
    outputs = sum(n for _, n in work)
    figures: dict[str, Any] = {"roofline": limits}
    texts = []
    for dtype in [d for d in dtypes if d in ("float32", "bfloat16")]:
        ours = rates[key("kvflow", dtype, dtypes[0])]
        bound = roofline.workload_bound_output_tok_s(limits, config, work, dtype)
        share = ours / bound
        figures[key("workload_bound_output_tok_s", dtype, dtypes[0])] = round(bound, 1)
        figures[key("share_of_compute_roofline", dtype, dtypes[0])] = round(share, 2)
        processed = ours * roofline.token_passes(work) / outputs
        texts.append(f"{dtype} {share:.0%} of the compute roofline (workload bound "
                     f"{bound:.1f} output tok/s; {processed:.0f} tokens processed/s)")
    # Output tokens/s over the all-tokens rate: what sessions 3-4 reported; it leaves out
    # the prompt tokens, two thirds of this workload's forward passes.
    all_tokens = limits["compute_bound_tok_s_bf16" if dtypes[0] == "bfloat16"
                        else "compute_bound_tok_s"]
    figures["output_rate_over_all_token_rate"] = round(rates["kvflow"] / all_tokens, 2)
    return figures, f"{'; '.join(texts)}; {roofline.describe(limits)}; "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=list(SHORT),
                        help="one dtype only (default: float32 then bfloat16 on cpu, "
                        "bfloat16 on cuda)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-hf-bf16", action="store_true",
                        help="no transformers bfloat16 baseline (slow on CPUs without bf16 "
                        "arithmetic)")
    parser.add_argument("--skip-hf-continuous", action="store_true",
                        help="run transformers' static batches only (its CB takes ~10 min)")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--attention-backend", default=None, choices=["cpu", "torch", "triton"])
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--eager-baseline", action="store_true",
                        help="on cuda, also run kvflow with enforce_eager (graphs on vs off)")
    parser.add_argument("--json", default="benchmarks/results/offline_throughput.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from kvflow.model.registry import resolve_model

    torch.set_num_threads(2)
    path = resolve_model(args.model)
    work = make_workload(AutoTokenizer.from_pretrained(path), args.num_requests, args.seed)
    on_cpu = args.device == "cpu"
    dtypes = [args.dtype] if args.dtype else ["float32", "bfloat16"] if on_cpu else ["bfloat16"]
    rates: dict[str, float] = {}
    engine = dict(attention_backend=args.attention_backend, enforce_eager=args.enforce_eager)
    for dtype in dtypes:
        rates[key("kvflow", dtype, dtypes[0])] = run_kvflow(
            str(path), work, args.max_num_seqs, args.device, dtype, **engine)
        gc.collect()  # the last engine's model and KV cache gone before the next loads
    if args.eager_baseline and not on_cpu and not args.enforce_eager:
        rates["kvflow_eager"] = run_kvflow(str(path), work, args.max_num_seqs, args.device,
                                           dtypes[0], **(engine | {"enforce_eager": True}))
        gc.collect()
    rates.update(run_baselines(args, path, work, dtypes))
    result = {
        "benchmark": "offline_throughput", "model": path.name, "requests": len(work),
        "device": args.device, "dtype": dtypes[0], "dtypes": dtypes,
        "attention_backend": args.attention_backend, "enforce_eager": args.enforce_eager,
        "output_tokens": sum(n for _, n in work),
        "tok_s": {k: round(v, 1) for k, v in rates.items()},
        "ratios": ratios(rates, dtypes),
    }
    limit_text = ""
    if on_cpu and dtypes[0] != "float16":  # (the roofline measures float32 and bf16)
        figures, limit_text = roofline_figures(path, work, rates, dtypes)
        result.update(figures)
    if not on_cpu:
        result["gpu"] = torch.cuda.get_device_name()
    write_result(args.json, result)
    parts = ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
    print(f"offline_throughput: output tok/s {parts}; ratios {result['ratios']}; {limit_text}"
          f"{len(work)} requests, {path.name}, {args.device} {'+'.join(dtypes)}; "
          f"{cpu_isa_line()}")


if __name__ == "__main__":
    main()
