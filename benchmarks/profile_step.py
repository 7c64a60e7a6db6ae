"""Where an engine step's time goes, at a steady batch of decodes.

Loads the offline-throughput workload (64 requests, prompts 16-512, outputs 16-256,
ignore_eos, greedy) into an in-process engine, steps until every request is decoding, then
profiles --steps steps with the torch profiler and prints the share of each part: the
model's linear layers, attention (cache write and kernel; the C kernel is no torch op, so
the call is wrapped in a labelled region here), the rest of the forward, the LM head,
sampling, scheduling, and whatever is left (input preparation, output bookkeeping).

Where a decode step runs each decoder layer as one C call (float32 up to GEMV_MAX_TOKENS
decodes), linear layers and attention happen inside that call: they are reported together
as "c_layers", and --split-c-layers turns the whole-layer path off to split them again.

With --device cuda the parts are host (CPU) time, since kernels run asynchronously, and
"gpu_busy" is the share of the step during which GPU kernels ran: well under 100% means the
step is bound by the host launching work, not by the GPU.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from common import make_workload, write_result
from torch.profiler import record_function

LABELS = {"step"}  # every region this script names


def labelled(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    LABELS.add(name)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return fn(*args, **kwargs)
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quantization", default=None, choices=[None, "int8"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--attention-backend", default=None, choices=["cpu", "torch", "triton"])
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--split-c-layers", action="store_true",
                        help="run decode layers op by op, to split linear from attention")
    parser.add_argument("--json", default="benchmarks/results/profile_step.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from kvflow import SamplingParams
    from kvflow.config import EngineArgs
    from kvflow.engine.llm_engine import LLMEngine
    from kvflow.model import llama
    from kvflow.model.layers import CpuLinear
    from kvflow.model.quant import Int8Linear
    from kvflow.model.registry import resolve_model

    path = resolve_model(args.model)
    work = make_workload(AutoTokenizer.from_pretrained(path), args.num_requests, 0)
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(path), max_num_seqs=args.num_requests, disable_log_stats=True,
        quantization=args.quantization, device=args.device,
        attention_backend=args.attention_backend, enforce_eager=args.enforce_eager))
    core = engine.core
    runner = core.runner
    runner.model.forward = labelled("forward", runner.model.forward)
    runner.model.compute_logits = labelled("lm_head", runner.model.compute_logits)
    runner.sampler = labelled("sample", runner.sampler)
    core.scheduler.schedule = labelled("schedule", core.scheduler.schedule)
    llama.paged_attention = labelled("attention", llama.paged_attention)  # torch or C path
    from kvflow.model import cpu_kernels

    cpu_kernels.decode_layer = labelled("c_layers", cpu_kernels.decode_layer)
    if args.split_c_layers:
        runner.model.model._c_decode_layers = lambda metadata: None
    for module in runner.model.modules():  # C kernels are no torch ops: label their calls
        if isinstance(module, CpuLinear | Int8Linear):
            module.forward = labelled("linear", module.forward)  # type: ignore[method-assign]

    for i, (ids, n) in enumerate(work):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    # Step until all prompts are in (every request then decodes), plus a few steps.
    while core.scheduler.stats().num_waiting_reqs or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    batch = len(core.scheduler.running)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            with record_function("step"):
                engine.step()
        step_s = (time.perf_counter() - t0) / args.steps
    # host-side events only: on CUDA each labelled region also appears as a GPU annotation
    totals = {e.key: e.cpu_time_total / 1e6 / args.steps for e in prof.key_averages()
              if e.device_type == torch.autograd.DeviceType.CPU}
    linear = totals.get("linear", 0.0) or sum(
        totals.get(k, 0.0) for k in ("mkldnn::_linear_pointwise", "aten::linear"))
    head = totals.get("lm_head", 0.0)
    linear -= min(linear, head)  # the head's matmul is counted under lm_head
    forward = totals.get("forward", 0.0)
    attn = totals.get("attention", 0.0)
    c_layers = totals.get("c_layers", 0.0)
    parts = {
        "c_layers": c_layers, "linear": linear, "attention": attn,
        "forward_other": forward - c_layers - linear - attn,
        "lm_head": head, "sample": totals.get("sample", 0.0),
        "schedule": totals.get("schedule", 0.0),
    }
    parts["other"] = totals.get("step", step_s) - sum(parts.values())
    step = totals.get("step", step_s)
    shares = {k: round(100 * v / step, 1) for k, v in parts.items()}
    if args.device == "cuda":
        # the labelled regions' GPU-side annotations span kernels counted already
        kernels_s = sum(e.self_device_time_total for e in prof.key_averages()
                        if e.device_type == torch.autograd.DeviceType.CUDA
                        and e.key not in LABELS) / 1e6 / args.steps
        shares["gpu_busy"] = round(100 * kernels_s / step, 1)
    write_result(args.json, {"benchmark": "profile_step", "batch": batch,
                             "step_ms": round(1e3 * step, 1), "share_pct": shares,
                             "device": args.device, "model": path.name,
                             "attention_backend": runner.attention_backend,
                             "enforce_eager": args.enforce_eager})
    print(f"profile_step: {batch} decodes, step {1e3 * step:.0f} ms: "
          + ", ".join(f"{k} {v}%" for k, v in shares.items()))


if __name__ == "__main__":
    main()
