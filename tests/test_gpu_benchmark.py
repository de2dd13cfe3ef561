"""benchmarks/gpu.py runs end to end on the CPU (``--tiny``): every part, its JSON lines file, its last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_runs_tiny_on_the_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu.py"), "--tiny", "--device", "cpu", "--out", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    last = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"split_ratio", "batching_speedup", "server_peak_gb", "client_peak_gb"} <= set(last)
    assert all(value > 0 for value in last.values())
    records = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    parts = [r["part"] for r in records]
    assert parts.count("equivalence") == 2 and all(r["ok"] for r in records if r["part"] == "equivalence")
    assert {"setup", "memory", "step_time", "federation", "summary"} <= set(parts)
