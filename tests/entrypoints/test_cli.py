"""`kvflow generate` from the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kvflow.entrypoints.cli import build_parser


def test_generate_prints_the_completion(tiny_llama_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvflow.entrypoints.cli", "--log-level", "WARNING", "generate",
         "Once upon a time", "--model", str(tiny_llama_path), "--max-tokens", "6",
         "--kv-cache-memory-gb", "0.05"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once upon a time")
    assert len(result.stdout.strip()) > len("Once upon a time")


def test_engine_flags_come_from_the_config() -> None:
    args = build_parser().parse_args(
        ["generate", "hi", "--max-num-seqs", "7", "--no-enable-prefix-caching",
         "--scheduling-policy", "priority"])
    assert args.max_num_seqs == 7 and args.enable_prefix_caching is False
    assert args.scheduling_policy == "priority"
