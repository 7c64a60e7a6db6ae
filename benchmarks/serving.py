"""Serving benchmark: `kvflow bench serve` against `kvflow serve` and llama.cpp's llama-server.

The same fixed-seed streaming workload (greedy, prompts of ~128 words, ~64 output tokens) at
three Poisson request rates, against each server in turn in this invocation, default model,
CPU. The baseline is llama.cpp's own HTTP server with continuous batching (`--parallel N
--cont-batching`, one unified KV cache), built by benchmarks/build_llama_server.sh from the
llama.cpp source that the pinned llama-cpp-python ships, serving the default model's GGUF
re-encoded as F32: the weights kvflow serves, at the same precision. `--with-transformers`
adds `transformers serve` (slow: it serves one request at a time).

Each rate uses its own prompt seed, so no server's prefix cache is warm from the rate before.
Prints one result line (output throughput and median TTFT ratios, kvflow / llama-server, per
rate); --out writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

from common import free_port, start_server, stop_server, write_result
from llamacpp import llama_server_binary

from kvflow.entrypoints.bench_serve import add_bench_serve_args
from kvflow.entrypoints.bench_serve import main as bench_main


def run_rates(cmd: list[str], port: int, model: str, args: argparse.Namespace,
              log: Path) -> list[dict[str, Any]]:
    """Start one server, load it at each rate (prompt seed = seed + rate index), stop it."""
    proc = start_server(cmd, port, log)
    try:
        runs = []
        for i, rate in enumerate(args.request_rates):
            bench_args = argparse.Namespace(**{
                **vars(args), "base_url": f"http://127.0.0.1:{port}", "model": model,
                "json": None, "request_rate": rate, "seed": args.seed + i})
            runs.append(bench_main(bench_args))
        return runs
    finally:
        stop_server(proc)


def llama_server_cmd(binary: Path, gguf: Path, port: int, parallel: int,
                     threads: int) -> list[str]:
    # One KV cache shared by all slots (--kv-unified), 512 tokens a slot on average: room for
    # every slot busy with this workload's longest request (~250 prompt + 96 output tokens).
    return [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--alias", "llama-server", "--parallel", str(parallel), "--cont-batching",
            "--kv-unified", "--ctx-size", str(512 * parallel), "--threads", str(threads),
            "--threads-batch", str(threads), "--no-webui"]


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def summary_line(args: argparse.Namespace, results: dict[str, Any]) -> str:
    ours, rates = results["kvflow"], args.request_rates
    tput = "/".join(f"{r['output_throughput']:.1f}" for r in ours)
    line = (f"serving, {args.num_prompts} prompts at {'/'.join(f'{r:g}' for r in rates)} "
            f"req/s: kvflow serve {tput} tok/s")
    base = results.get("llama_server")
    if base is None:
        return line + f"; llama-server skipped ({results['llama_server_skipped']})"
    pairs = list(zip(ours, base, strict=True))
    tput_x = [ratio(o["output_throughput"], b["output_throughput"]) for o, b in pairs]
    ttft_x = [ratio(o["median_ttft_ms"], b["median_ttft_ms"]) for o, b in pairs]
    met = tput_x[-1] >= 1.5 and all(x < 1 for x in ttft_x)
    results |= {"throughput_ratios": tput_x, "median_ttft_ratios": ttft_x, "targets_met": met}
    line += (f" = {'/'.join(f'{x:.2f}' for x in tput_x)}x llama-server's output throughput, "
             f"median TTFT {'/'.join(f'{x:.2f}' for x in ttft_x)}x llama-server's "
             f"(targets >= 1.5x at {rates[-1]:g} req/s and < 1x at every rate: "
             f"{'met' if met else 'NOT met'})")
    if "transformers" in results:
        line += "; transformers serve " + "/".join(
            f"{r['output_throughput']:.1f}" for r in results["transformers"]) + " tok/s"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_serve_args(parser)
    parser.set_defaults(num_prompts=40, ignore_eos=False, base_url=None)
    parser.add_argument("--request-rates", type=lambda s: [float(x) for x in s.split(",")],
                        default=[0.5, 1.0, 2.0], help="comma-separated requests per second")
    parser.add_argument("--llama-server", default=None,
                        help="llama-server binary (default: $LLAMA_SERVER, else the one "
                        "benchmarks/build_llama_server.sh cached)")
    parser.add_argument("--llama-parallel", type=int, default=32,
                        help="llama-server's slots (requests decoded together)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="compute threads of each server (kvflow's --num-threads, "
                        "llama-server's --threads and --threads-batch)")
    parser.add_argument("--with-transformers", action="store_true",
                        help="also run `transformers serve` (one request at a time: slow)")
    parser.add_argument("--logs", default="/tmp", help="folder for the servers' logs")
    parser.add_argument("--out", default=None, help="write every run's figures as JSON here")
    args = parser.parse_args()
    # A SIGTERM (e.g. from `timeout`) must still stop the server we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logs = Path(args.logs)
    results: dict[str, Any] = {"benchmark": "serving", "num_prompts": args.num_prompts,
                               "request_rates": args.request_rates, "threads": args.threads,
                               "llama_parallel": args.llama_parallel}

    binary = llama_server_binary(args.llama_server)
    if binary is None:
        results["llama_server_skipped"] = ("no llama-server binary: build it with "
                                           "benchmarks/build_llama_server.sh (~30-40 min on "
                                           "2 cores) or pass --llama-server")
        print(results["llama_server_skipped"], flush=True)
    port = free_port()
    results["kvflow"] = run_rates(
        [sys.executable, "-m", "kvflow.entrypoints.cli", "serve", "--port", str(port),
         "--disable-access-log", "--disable-log-stats", "--num-threads", str(args.threads)],
        port, "smollm2-135m-instruct", args, logs / "kvflow-serve.log")
    if binary is not None:
        import llamacpp

        gguf = llamacpp.default_model_as("F32")
        port = free_port()
        results["llama_server"] = run_rates(
            llama_server_cmd(binary, gguf, port, args.llama_parallel, args.threads), port,
            "llama-server",
            args, logs / "llama-server.log")
        results["llama_server_binary"] = str(binary)
    if args.with_transformers:
        from kvflow.model.registry import resolve_model

        path, port = str(resolve_model(None)), free_port()
        results["transformers"] = run_rates(
            [str(Path(sys.executable).parent / "transformers"), "serve", path, "--port",
             str(port), "--device", "cpu"], port, path, args, logs / "transformers-serve.log")
    print(summary_line(args, results), flush=True)
    if args.out:
        write_result(args.out, results)


if __name__ == "__main__":
    main()
