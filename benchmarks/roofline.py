"""The machine's limits for a model, measured now: matmul GFLOP/s at its shapes, read bandwidth.

What they allow:
- compute-bound tokens/s at large batch = matmul FLOP/s / (2 x linear weights per token),
- bandwidth-bound tokens/s at batch 1 = read bandwidth / bytes of weights read per token.
Attention and the small ops are left out of both, so they are upper bounds.

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
from common import write_result


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


def workload_bound_output_tok_s(limits: dict[str, Any], config: Any,
                                work: list[tuple[list[int], int]]) -> float:
    """Output tokens/s if every linear FLOP the workload needs ran at the measured best."""
    best = max(limits["matmul_gflops"].values()) * 1e9
    return sum(n for _, n in work) * best / workload_flops(config, work)


def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_gflops(shapes: list[tuple[int, int]], batch: int, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of one pass through every distinct shape (weighted by count), two ways."""
    from kvflow.model.layers import onednn_linear

    counts: dict[tuple[int, int], int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    flops = sum(2 * batch * n * k * c for (n, k), c in counts.items())
    x = {k: torch.randn(batch, k) for _, k in counts}
    weights = {s: torch.randn(*s) / s[1] ** 0.5 for s in counts}
    out: dict[str, float] = {}
    with torch.inference_mode():
        t = sum(c * _best_time(lambda s=s: F.linear(x[s[1]], weights[s]), repeats)
                for s, c in counts.items())
        out["torch_linear"] = flops / t / 1e9
        t = sum(c * _best_time(lambda s=s: onednn_linear(x[s[1]], weights[s], None), repeats)
                for s, c in counts.items())
        out["onednn"] = flops / t / 1e9
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
    best = max(gflops.values())
    bandwidth = read_bandwidth_gbs()
    return {
        "matmul_batch": batch, "matmul_gflops": {k: round(v, 1) for k, v in gflops.items()},
        "read_bandwidth_gbs": round(bandwidth, 1),
        "linear_params": params,
        "compute_bound_tok_s": round(best * 1e9 / (2 * params), 1),
        "bandwidth_bound_tok_s_fp32": round(bandwidth * 1e9 / (4 * params), 1),
        "bandwidth_bound_tok_s_int8": round(bandwidth * 1e9 / params, 1),
    }


def describe(r: dict[str, Any]) -> str:
    best = max(r["matmul_gflops"].values())
    return (f"matmul {best:.0f} GFLOP/s at batch {r['matmul_batch']}, "
            f"read {r['read_bandwidth_gbs']} GB/s -> compute-bound {r['compute_bound_tok_s']} "
            f"tok/s, bandwidth-bound {r['bandwidth_bound_tok_s_fp32']} tok/s fp32 / "
            f"{r['bandwidth_bound_tok_s_int8']} int8")


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
    print(f"roofline: {describe(result)} ({path.name})")


if __name__ == "__main__":
    main()
