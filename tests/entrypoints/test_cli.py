"""`kvflow generate` from the command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvflow.entrypoints.cli import build_parser
from kvflow.logger import LOGGING_LEVEL_ENV, resolve_level

PROMPT = "Once upon a time"
GENERATE_ARGS = [PROMPT, "--max-tokens", "6", "--kv-cache-memory-gb", "0.05", "--num-threads", "1"]
# A log line of any level at or under INFO, in the formats of the client and the engine core
INFO_LINE = re.compile(r"^\S+ \S+ (DEBUG|INFO) ", re.MULTILINE)
KV_SIZING = re.compile(r"INFO engine-core: KV cache: \d+ blocks")


def run_cli(args: list[str], env: dict[str, str] | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != LOGGING_LEVEL_ENV}
    return subprocess.run([sys.executable, "-m", "kvflow.entrypoints.cli", *args],
                          input=stdin, capture_output=True, text=True, timeout=300,
                          env={**clean, **(env or {})})


def test_generate_prints_the_completion_and_no_logs(tiny_llama_path: Path) -> None:
    result = run_cli(["generate", *GENERATE_ARGS, "--model", str(tiny_llama_path)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(PROMPT) and result.stdout.count("\n") == 1  # the text alone
    assert len(result.stdout.strip()) > len(PROMPT)
    assert not INFO_LINE.search(result.stderr), result.stderr  # WARNING unless asked


def test_engine_flags_come_from_the_config() -> None:
    args = build_parser().parse_args(
        ["generate", "hi", "--max-num-seqs", "7", "--no-enable-prefix-caching",
         "--scheduling-policy", "priority"])
    assert args.max_num_seqs == 7 and args.enable_prefix_caching is False
    assert args.scheduling_policy == "priority"


def test_generate_logs_to_stderr_when_asked(tiny_llama_path: Path) -> None:
    result = run_cli(["generate", *GENERATE_ARGS, "--model", str(tiny_llama_path)],
                     env={LOGGING_LEVEL_ENV: "info"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(PROMPT) and result.stdout.count("\n") == 1
    assert re.search(r"INFO kvflow\.engine\.core: KV cache: \d+ blocks", result.stderr), \
        result.stderr


@pytest.mark.slow  # two chats, each starting an engine-core process
def test_chat_engine_core_process_obeys_the_level(tiny_llama_path: Path) -> None:
    args = ["chat", str(tiny_llama_path), "--kv-cache-memory-gb", "0.05", "--num-threads", "1",
            "--max-tokens", "4"]
    quiet = run_cli(args, stdin="hello\n")
    assert quiet.returncode == 0, quiet.stderr
    assert not INFO_LINE.search(quiet.stderr) and not INFO_LINE.search(quiet.stdout)
    loud = run_cli([*args, "--verbose"], stdin="hello\n")
    assert loud.returncode == 0, loud.stderr
    assert KV_SIZING.search(loud.stderr), loud.stderr  # logged by the engine-core process
    assert not INFO_LINE.search(loud.stdout)
    assert quiet.stdout.count("> ") == loud.stdout.count("> ") == 2


def test_log_level_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOGGING_LEVEL_ENV, raising=False)
    assert resolve_level(None, "WARNING") == "WARNING"
    monkeypatch.setenv(LOGGING_LEVEL_ENV, "debug")
    assert resolve_level(None, "WARNING") == "DEBUG"
    assert resolve_level("error", "WARNING") == "ERROR"  # --log-level / --verbose win
    monkeypatch.setenv(LOGGING_LEVEL_ENV, "loud")
    with pytest.raises(ValueError, match=LOGGING_LEVEL_ENV):
        resolve_level(None, "INFO")
    assert build_parser().parse_args(["generate", "hi", "-v"]).verbose
    assert build_parser().parse_args(["chat"]).default_log_level == "WARNING"
    assert not hasattr(build_parser().parse_args(["serve"]), "default_log_level")
