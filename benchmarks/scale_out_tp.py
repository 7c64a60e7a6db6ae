"""Tensor parallelism: TP=2 against TP=1 on the default model, same total threads.

The offline workload of offline_throughput.py (64 requests, fixed seed, prompts 16-512
tokens, outputs 16-256 with ignore_eos, greedy) runs through LLM.generate with
tensor_parallel_size=1 (2 threads) and =2 (1 thread per rank, each rank pinned to its own
CPU), and once more at TP=2 with every all-reduce on gloo (KVFLOW_TP_SHM_ALL_REDUCE=0) to
show what the shared-memory all-reduce saves. Each run is its own process (a TP run pins
its rank 0 to one CPU), with GOMP_SPINCOUNT=20000 as in an engine-core process.
Communication per step: rank 0's seconds in all-reduces, the step broadcast and the
logits gather, over the steps (broadcasts); on rank 0 it includes waiting for the other
rank.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from typing import Any

from common import cpu_isa_line, make_workload, write_result

Work = list[tuple[list[int], int]]


def run(tp: int, work: Work, threads: int, shm: bool) -> dict[str, Any]:
    """Output tokens/s of one engine on the workload, and rank 0's collective counters."""
    os.environ["KVFLOW_TP_SHM_ALL_REDUCE"] = "1" if shm else "0"
    # what the engine-core process sets (core_client): libgomp's default spin-wait made the
    # 2-thread run's barriers crawl whenever the shared machine descheduled one thread
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")
    from kvflow import LLM, SamplingParams

    llm = LLM(None, tensor_parallel_size=tp, num_threads=threads, max_num_seqs=64,
              kv_cache_memory_gb=2.0, disable_log_stats=True, dtype="float32")
    warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": work[0][0]}], warm, use_tqdm=False)
    executor = llm.llm_engine.core.executor
    group = getattr(executor, "group", None)
    before = (dict(group.seconds), dict(group.calls)) if group else None
    prompts = [{"prompt_token_ids": ids} for ids, _ in work]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in work]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    result: dict[str, Any] = {"tok_s": produced / elapsed, "seconds": elapsed}
    if group is not None and before is not None:
        seconds = {k: v - before[0][k] for k, v in group.seconds.items()}
        calls = {k: v - before[1][k] for k, v in group.calls.items()}
        steps = max(1, calls["broadcast"])
        result.update(steps=steps, comm_ms_per_step=1e3 * sum(seconds.values()) / steps,
                      all_reduce_ms_per_step=1e3 * seconds["all_reduce"] / steps,
                      all_reduce_us_each=1e6 * seconds["all_reduce"] / max(1, calls["all_reduce"]),
                      comm_share=sum(seconds.values()) / elapsed)
    executor.shutdown()
    return result


def in_process(tp: int, work: Work, threads: int, shm: bool) -> dict[str, Any]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run, (tp, work, threads, shm))


def run_part_a(args: argparse.Namespace) -> dict[str, Any]:
    """TP=2 against TP=1 (and TP=2 over gloo unless --skip-gloo); prints the result line.
    Also called by benchmarks/scale_out.py as its part (a)."""
    from transformers import AutoTokenizer

    from kvflow.model.registry import resolve_model

    path = resolve_model(None)
    work = make_workload(AutoTokenizer.from_pretrained(path), args.tp_requests, args.seed)
    runs = {"tp1": in_process(1, work, args.threads, True),
            "tp2": in_process(2, work, args.threads, True)}
    if not args.skip_gloo:
        runs["tp2_gloo"] = in_process(2, work, args.threads, False)
    ratio = runs["tp2"]["tok_s"] / runs["tp1"]["tok_s"]
    tp2 = runs["tp2"]
    gloo = runs.get("tp2_gloo")
    gloo_text = (f"; TP=2 with gloo all-reduces {gloo['tok_s']:.1f} tok/s "
                 f"({gloo['tok_s'] / runs['tp1']['tok_s']:.2f}x TP=1, "
                 f"{gloo['all_reduce_us_each']:.0f} us per all-reduce)") if gloo else ""
    print(f"scale_out_tp: TP=2 {tp2['tok_s']:.1f} tok/s vs TP=1 {runs['tp1']['tok_s']:.1f} "
          f"tok/s = {ratio:.2f}x at {args.threads} threads in all; communication "
          f"{tp2['comm_ms_per_step']:.2f} ms/step over {tp2['steps']} steps "
          f"({tp2['all_reduce_us_each']:.0f} us per all-reduce, {tp2['comm_share']:.0%} of "
          f"the run){gloo_text}; {len(work)} requests, {path.name}, float32; {cpu_isa_line()}")
    return {"benchmark": "scale_out_tp", "model": path.name, "requests": len(work),
            "output_tokens": sum(n for _, n in work), "total_threads": args.threads,
            "runs": {k: {m: round(v, 3) for m, v in r.items()} for k, r in runs.items()},
            "tp2_over_tp1": round(ratio, 3)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp-requests", type=int, default=64,
                        help="requests of the tensor-parallel run")
    parser.add_argument("--threads", type=int, default=2, help="total threads of each TP run")
    parser.add_argument("--skip-gloo", action="store_true",
                        help="no TP=2 run with gloo all-reduces")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/results/scale_out_tp.json")
    args = parser.parse_args()
    write_result(args.json, run_part_a(args))


if __name__ == "__main__":
    main()
