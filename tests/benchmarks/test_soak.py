"""benchmarks/soak.py in its 5-minute mode: mixed, hostile traffic past capacity leaves no
5xx but 503, no request state and no KV block held once the traffic stops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_five_minute_soak_has_no_5xx_and_no_leaks(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--minutes", "5",
           "--probe-seconds", "30", "--warmup-seconds", "60", "--logs", str(tmp_path),
           "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1400)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    outcomes = result["outcomes"]
    assert result["5xx_other"] == 0, result["unexpected"]
    assert result["leaked_kv_blocks"] == 0 and result["leaked_requests"] == 0, result["leaks"]
    # no valid request refused, no malformed body accepted, no transport failure
    assert outcomes["other"] == 0, result["unexpected"]
    # the whole mix ran: answers, refusals of malformed bodies, clients that went away
    assert outcomes["ok"] > 0 and outcomes["4xx_expected"] > 0 and outcomes["cancelled"] > 0
    assert result["ttft_samples"] > 0
    assert run.returncode == 0, run.stdout[-2000:]
    print(run.stdout[-3000:])  # the table and the result line, shown with `pytest -s`
