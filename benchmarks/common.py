"""Shared pieces of the benchmark scripts: workload, machine facts, result output."""

from __future__ import annotations

import json
import os
import platform
import random
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
