"""Serving benchmark: `kvflow bench serve` against `kvflow serve` and `transformers serve`.

The same fixed-seed workload (greedy, no ignore_eos, which transformers serve refuses, so
both servers should produce the same tokens) at the same request rate, one server after
the other in this invocation, default model, CPU. Prints one result line; --json writes
every figure of both runs.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from pathlib import Path
from typing import Any

from common import free_port, start_server, stop_server

from kvflow.entrypoints.bench_serve import add_bench_serve_args
from kvflow.entrypoints.bench_serve import main as bench_main


def run_against(cmd: list[str], port: int, model: str, args: argparse.Namespace,
                log: Path) -> dict[str, Any]:
    proc = start_server(cmd, port, log)
    try:
        bench_args = argparse.Namespace(**{**vars(args), "base_url": f"http://127.0.0.1:{port}",
                                           "model": model, "json": None})
        return bench_main(bench_args)
    finally:
        stop_server(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_bench_serve_args(parser)
    parser.set_defaults(request_rate=4.0, ignore_eos=False, base_url=None)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--logs", default="/tmp", help="folder for the servers' logs")
    parser.add_argument("--out", default=None, help="write both runs' figures as JSON here")
    args = parser.parse_args()
    # A SIGTERM (e.g. from `timeout`) must still stop the server we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from common import write_result

    from kvflow.model.registry import resolve_model

    path = str(resolve_model(None))
    results: dict[str, Any] = {"benchmark": "serving", "num_prompts": args.num_prompts,
                               "request_rate": args.request_rate}
    port = free_port()
    results["kvflow"] = run_against(
        [sys.executable, "-m", "kvflow.entrypoints.cli", "serve", "--port", str(port),
         "--disable-access-log", "--disable-log-stats"],
        port, "smollm2-135m-instruct", args, Path(args.logs) / "kvflow-serve.log")
    line = f"kvflow serve: {results['kvflow']['output_throughput']:.1f} tok/s"
    if not args.skip_transformers:
        port = free_port()
        results["transformers"] = run_against(
            [str(Path(sys.executable).parent / "transformers"), "serve", path, "--port",
             str(port), "--device", "cpu"],
            port, path, args, Path(args.logs) / "transformers-serve.log")
        ratio = results["kvflow"]["output_throughput"] / max(
            results["transformers"]["output_throughput"], math.ulp(1.0))
        line += (f", transformers serve: {results['transformers']['output_throughput']:.1f} "
                 f"tok/s ({ratio:.1f}x)")
    print(f"serving, {args.num_prompts} prompts at {args.request_rate} req/s: {line}")
    if args.out:
        write_result(args.out, results)


if __name__ == "__main__":
    main()
