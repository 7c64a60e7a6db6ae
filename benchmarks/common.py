"""Shared pieces of the benchmark scripts: workload, machine facts, result output."""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

TEXT_SEED = (
    "In the beginning the river ran through the valley and the people built their houses "
    "along its banks, farming the fertile land and trading with the towns downstream. "
)


def make_workload(tokenizer: Any, num: int, seed: int, prompt_range: tuple[int, int] = (16, 512),
                  output_range: tuple[int, int] = (16, 256)) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) pairs with a fixed seed."""
    rng = random.Random(seed)
    corpus = tokenizer(TEXT_SEED * 200)["input_ids"]
    work = []
    for _ in range(num):
        plen, olen = rng.randint(*prompt_range), rng.randint(*output_range)
        start = rng.randint(0, len(corpus) - plen - 1)
        work.append((corpus[start:start + plen], olen))
    return work


def cpu_isa_line() -> str:
    """The CPU model, kvflow's kernel level in use and the ISA flags, in one line."""
    from kvflow.model import cpu_isa

    return cpu_isa.detect().describe()


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"machine": f"{cpu}, {os.cpu_count()} cpus", "torch_threads": torch.get_num_threads(),
            "cpu_isa": cpu_isa_line(), "date": time.strftime("%Y-%m-%d"), "commit": commit}


def write_result(path: str, result: dict[str, Any]) -> None:
    result.update(machine())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(cmd: list[str], port: int, log: Path,
                 timeout: float = 600) -> subprocess.Popen[bytes]:
    """Start a server in its own session (its children stop with it); wait for /health."""
    import httpx

    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"{cmd} did not become healthy: see {log}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's whole process group; SIGKILL it after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
