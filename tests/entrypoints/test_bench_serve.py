"""`kvflow bench serve`: the workload is fixed by the seed; a run against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvflow.entrypoints.bench_serve import arrival_delays, build_workload
from kvflow.entrypoints.cli import main as cli_main
from tests.entrypoints.conftest import TINY_ARGS, RemoteServer


def test_workload_is_fixed_by_the_seed() -> None:
    first = build_workload(20, input_len=30, output_len=10, range_ratio=0.5, seed=1)
    assert first == build_workload(20, input_len=30, output_len=10, range_ratio=0.5, seed=1)
    assert first != build_workload(20, input_len=30, output_len=10, range_ratio=0.5, seed=2)
    assert all(15 <= len(s.prompt.split()) <= 45 and 5 <= s.output_len <= 15 for s in first)


def test_poisson_arrivals() -> None:
    gaps = arrival_delays(4000, rate=8.0, seed=0)
    assert abs(sum(gaps) / len(gaps) - 1 / 8.0) < 0.01
    assert arrival_delays(3, rate=float("inf"), seed=0) == [0.0, 0.0, 0.0]


def test_bench_serve_against_a_server(tiny_llama_path: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    with RemoteServer([str(tiny_llama_path), *TINY_ARGS]) as server:
        out = tmp_path / "bench.json"
        done = subprocess.run(
            [sys.executable, "-m", "kvflow.entrypoints.cli", "bench", "serve",
             "--base-url", server.url(), "--num-prompts", "8", "--request-rate", "20",
             "--input-len", "16", "--output-len", "8", "--json", str(out)],
            capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        for figure in ("Request throughput (req/s):", "Output token throughput (tok/s):",
                       "Mean TTFT (ms):", "P99 TPOT (ms):", "Median (p50) ITL (ms):"):
            assert figure in done.stdout
        result = json.loads(out.read_text())
        assert result["completed"] == 8 and result["failed"] == 0
        assert result["total_output_tokens"] == sum(
            s.output_len for s in build_workload(8, 16, 8, 0.5, 0))
        assert result["mean_ttft_ms"] > 0 and result["request_throughput"] > 0
        # in-process this time (no second interpreter start-up)
        assert cli_main(["bench", "serve", "--base-url", server.url(), "--num-prompts", "4",
                         "--max-concurrency", "2", "--endpoint", "/v1/chat/completions",
                         "--disable-tqdm", "--no-warmup"]) == 0
        assert "Successful requests:                         4" in capsys.readouterr().out
