"""The machine's limits for a model, measured now: matmul GFLOP/s at its shapes (float32 and
bfloat16), read bandwidth.

What they allow:
- compute-bound tokens/s at large batch = matmul FLOP/s / (2 x linear weights per token),
- bandwidth-bound tokens/s at batch 1 = read bandwidth / bytes of weights read per token
  (4 per weight in float32, 2 in bfloat16, 1 in int8).
Attention and the small ops are left out of both, so they are upper bounds.

The bfloat16 compute bound is the measured bf16 matmul speed, or the float32 one where that
is faster: bf16 weights can be widened to float32 as they are used (kvflow does so where the
CPU has no bf16 arithmetic; the cost is one pass over the weights per 256 tokens), so on
such a CPU a bf16-only bound would not bound anything. On an AVX512-BF16 or AMX CPU the
bf16 speed is the larger.

Compute-bound tokens/s counts every token a forward pass takes, prompt tokens included. For
a workload of (prompt, output length) requests, `workload_bound_output_tok_s` turns it into
output tokens/s: the least work any engine must do is every prompt token and every output
token but the last through the decoder layers, and the LM head once per output token.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import cpu_isa_line, write_result


def linear_shapes(config: Any) -> list[tuple[int, int]]:
    """(out, in) of every weight a token passes through, LM head included."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    layer = [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q),
             (inter, hidden), (inter, hidden), (hidden, inter)]
    return layer * config.num_hidden_layers + [(config.vocab_size, hidden)]


def token_passes(work: list[tuple[list[int], int]]) -> int:
    """Tokens a workload must run through the decoder layers: each prompt token, and each
    output token but the last (it is never fed back)."""
    return sum(len(prompt) + n - 1 for prompt, n in work)


def workload_flops(config: Any, work: list[tuple[list[int], int]]) -> float:
    """Linear-layer FLOPs a workload needs at least (no padding, no recomputation)."""
    shapes = linear_shapes(config)
    head = config.vocab_size * config.hidden_size
    layers = sum(n * k for n, k in shapes) - head
    heads = sum(n for _, n in work)  # positions whose next token is sampled
    return 2.0 * (layers * token_passes(work) + head * heads)


def compute_gflops(limits: dict[str, Any], dtype: str = "float32") -> float:
    """The best measured matmul GFLOP/s for weights in `dtype` (float32 or bfloat16)."""
    if dtype == "bfloat16":
        return limits["compute_gflops_bf16"]
    if dtype != "float32":
        raise ValueError(f"no CPU roofline for {dtype}")
    return max(limits["matmul_gflops"].values())


def workload_bound_output_tok_s(limits: dict[str, Any], config: Any,
                                work: list[tuple[list[int], int]],
                                dtype: str = "float32") -> float:
    """Output tokens/s if every linear FLOP the workload needs ran at the measured best."""
    best = compute_gflops(limits, dtype) * 1e9
    return sum(n for _, n in work) * best / workload_flops(config, work)


def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_gflops(shapes: list[tuple[int, int]], batch: int, repeats: int = 3,
                  dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """GFLOP/s of one pass through every distinct shape (weighted by count), in `dtype`, two
    ways: MKL's F.linear and oneDNN. bfloat16 through oneDNN only where kvflow runs it (a CPU
    with native bf16; on an AVX2 CPU oneDNN refuses bf16)."""
    from kvflow.model import cpu_isa
    from kvflow.model.layers import onednn_linear

    counts: dict[tuple[int, int], int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    flops = sum(2 * batch * n * k * c for (n, k), c in counts.items())
    x = {k: torch.randn(batch, k).to(dtype) for _, k in counts}
    weights = {s: (torch.randn(*s) / s[1] ** 0.5).to(dtype) for s in counts}
    ways: dict[str, Any] = {"torch_linear": F.linear}
    if dtype == torch.float32 or cpu_isa.detect().native_bf16:
        ways["onednn"] = lambda a, w: onednn_linear(a, w, None)
    out: dict[str, float] = {}
    with torch.inference_mode():
        for name, linear in ways.items():
            t = sum(c * _best_time(lambda s=s, f=linear: f(x[s[1]], weights[s]), repeats)
                    for s, c in counts.items())
            out[name] = flops / t / 1e9
    return out


def read_bandwidth_gbs(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """GB/s of a reduction over a buffer far larger than the caches."""
    buf = torch.ones(size_bytes // 4)
    return size_bytes / _best_time(lambda: buf.sum(), repeats) / 1e9


def measure(model_path: Path, batch: int = 256) -> dict[str, Any]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    shapes = linear_shapes(config)
    params = sum(n * k for n, k in shapes)
    gflops = matmul_gflops(shapes, batch)
    gflops_bf16 = matmul_gflops(shapes, batch, dtype=torch.bfloat16)
    best = max(gflops.values())
    best_bf16 = max(*gflops_bf16.values(), best)  # widened to float32 where that is faster
    bandwidth = read_bandwidth_gbs()
    return {
        "matmul_batch": batch, "matmul_gflops": {k: round(v, 1) for k, v in gflops.items()},
        "read_bandwidth_gbs": round(bandwidth, 1),
        "linear_params": params,
        "compute_bound_tok_s": round(best * 1e9 / (2 * params), 1),
        "bandwidth_bound_tok_s_fp32": round(bandwidth * 1e9 / (4 * params), 1),
        "bandwidth_bound_tok_s_int8": round(bandwidth * 1e9 / params, 1),
        "matmul_gflops_bf16": {k: round(v, 1) for k, v in gflops_bf16.items()},
        "compute_gflops_bf16": round(best_bf16, 1),
        "bf16_compute_from": "bfloat16" if max(gflops_bf16.values()) >= best else "float32",
        "compute_bound_tok_s_bf16": round(best_bf16 * 1e9 / (2 * params), 1),
        "bandwidth_bound_tok_s_bf16": round(bandwidth * 1e9 / (2 * params), 1),
    }


def describe(r: dict[str, Any]) -> str:
    best = max(r["matmul_gflops"].values())
    bf16 = max(r["matmul_gflops_bf16"].values())
    widened = " (bf16 bound from float32)" if r["bf16_compute_from"] == "float32" else ""
    return (f"matmul {best:.0f} GFLOP/s float32 / {bf16:.0f} bf16 at batch "
            f"{r['matmul_batch']}, read {r['read_bandwidth_gbs']} GB/s -> compute-bound "
            f"{r['compute_bound_tok_s']} tok/s fp32 / {r['compute_bound_tok_s_bf16']} bf16"
            f"{widened}, bandwidth-bound {r['bandwidth_bound_tok_s_fp32']} tok/s fp32 / "
            f"{r['bandwidth_bound_tok_s_bf16']} bf16 / {r['bandwidth_bound_tok_s_int8']} int8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--json", default="benchmarks/results/roofline.json")
    args = parser.parse_args()
    from kvflow.model.registry import resolve_model

    path = resolve_model(args.model)
    result = {"benchmark": "roofline", "model": path.name, **measure(path, args.batch)}
    write_result(args.json, result)
    print(f"roofline: {describe(result)} ({path.name}; {cpu_isa_line()})")


if __name__ == "__main__":
    main()
