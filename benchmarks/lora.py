"""Multi-LoRA throughput: 64 requests of the offline workload over 8 adapters in one engine.

The offline workload (64 requests, fixed seed, prompts 16-512, outputs 16-256 with
ignore_eos, greedy, float32, default model), request i running adapter i % 8: eight random
PEFT adapters written by peft (rank 16, all seven projections), `max_loras=4`, so adapters
take turns in the four slots. In this invocation, on the same requests:
- kvflow on the base model alone (no LoRA anywhere: the ceiling),
- transformers + peft: the eight adapters loaded into one PeftModel, each adapter's requests
  generated in one padded static batch with that adapter active.
Targets (issue 15): >= 0.75x the base model's throughput, >= 5x transformers + peft.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch
from common import make_workload, write_result

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Work = list[tuple[list[int], int]]


def make_adapters(base: Path, folder: Path, count: int, rank: int) -> list[Path]:
    """`count` random adapters (A and B ~ N(0, 0.02)) saved by peft's save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                  target_modules=TARGETS))
    paths = []
    for i in range(count):
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, 0.02)
        paths.append(folder / f"adapter{i}")
        peft_model.save_pretrained(paths[-1])
    return paths


def run_kvflow(base: Path, work: Work, adapters: list[Path] | None, max_loras: int) -> float:
    from kvflow import LLM, LoRARequest, SamplingParams

    lora = {} if adapters is None else dict(enable_lora=True, max_loras=max_loras,
                                            max_lora_rank=16, max_cpu_loras=len(adapters))
    llm = LLM(str(base), max_num_seqs=64, kv_cache_memory_gb=2.0, disable_log_stats=True,
              **lora)  # type: ignore[arg-type]
    requests = None if adapters is None else [
        LoRARequest(f"adapter{i % len(adapters)}", i % len(adapters) + 1,
                    str(adapters[i % len(adapters)])) for i in range(len(work))]
    warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": work[0][0]}], warm, use_tqdm=False,
                 lora_request=None if requests is None else requests[0])
    prompts = [{"prompt_token_ids": ids} for ids, _ in work]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in work]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=requests)
    elapsed = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == sum(n for _, n in work)
    del llm
    gc.collect()
    return produced / elapsed


def run_peft(base: Path, work: Work, adapters: list[Path]) -> float:
    """Useful output tokens/s of transformers + peft, one padded batch per adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name="adapter0")
    for i, path in enumerate(adapters[1:], start=1):
        peft_model.load_adapter(path, adapter_name=f"adapter{i}")
    peft_model.eval()
    pad, useful = 0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(len(adapters)):
            batch = work[i::len(adapters)]
            peft_model.set_adapter(f"adapter{i}")
            longest = max(len(p) for p, _ in batch)
            ids = torch.tensor([[pad] * (longest - len(p)) + p for p, _ in batch])
            mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p, _ in batch])
            max_new = max(n for _, n in batch)
            peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                min_new_tokens=max_new, do_sample=False, pad_token_id=pad)
            useful += sum(n for _, n in batch)
    return useful / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/lora.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from kvflow.model.registry import resolve_model

    torch.set_num_threads(2)
    base = resolve_model(None)
    work = make_workload(AutoTokenizer.from_pretrained(base), args.num_requests, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(base, Path(tmp), args.num_adapters, args.rank)
        rates = {"kvflow_base": run_kvflow(base, work, None, args.max_loras),
                 "kvflow_lora": run_kvflow(base, work, adapters, args.max_loras)}
        if not args.skip_peft:
            rates["hf_peft_static"] = run_peft(base, work, adapters)
    ours = rates["kvflow_lora"]
    result = {
        "benchmark": "lora", "model": base.name, "requests": len(work),
        "adapters": args.num_adapters, "rank": args.rank, "max_loras": args.max_loras,
        "output_tokens": sum(n for _, n in work),
        "tok_s": {k: round(v, 1) for k, v in rates.items()},
        "ratios": {f"vs_{k}": round(ours / v, 2) for k, v in rates.items() if k != "kvflow_lora"},
    }
    write_result(args.json, result)
    parts = ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
    print(f"lora: output tok/s {parts}; ratios {result['ratios']}; {len(work)} requests over "
          f"{args.num_adapters} adapters (rank {args.rank}, 7 projections, max_loras "
          f"{args.max_loras}), {base.name}, cpu float32")


if __name__ == "__main__":
    main()
