"""Start a whole federation on this machine as child processes (demo, tests, benchmarks).

torchrun ``--standalone`` picks a free port itself, so runs never collide. The children run
in their own process group with a hard timeout: on timeout or error every process of the
group is killed and the error carries the tail of each process's log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "launch" / "train.py"


class FederationFailed(RuntimeError):
    """A federation run exited non-zero or timed out; the message holds its logs."""


@dataclass
class FederationRun:
    returncode: int
    output: str
    run_dir: Path


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def describe_logs(run_dir: Path, output: str) -> str:
    parts = [f"--- torchrun output (tail) ---\n{output[-6000:]}"]
    for log in sorted((run_dir / "logs").glob("*.log")) if (run_dir / "logs").is_dir() else []:
        parts.append(f"--- {log.name} (tail) ---\n{_tail(log)}")
    return "\n".join(parts)


def run_federation(
    config: str | Path,
    overrides: Sequence[str] = (),
    *,
    num_clients: int,
    run_dir: str | Path,
    timeout_s: float,
    extra_env: dict[str, str] | None = None,
    check: bool = True,
) -> FederationRun:
    """Run ``1 + num_clients`` processes of ``launch/train.py`` under torchrun and wait."""
    run_dir = Path(run_dir)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={num_clients + 1}",
        str(TRAIN_SCRIPT),
        "--config",
        str(config),
        f"run_dir={run_dir}",
        f"federation.num_clients={num_clients}",
        *overrides,
    ]
    env = dict(os.environ)
    env.update(extra_env or {})
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise FederationFailed(
            f"federation did not finish within {timeout_s:.0f}s; killed.\n{describe_logs(run_dir, output)}"
        ) from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if check and proc.returncode != 0:
        raise FederationFailed(f"federation exited with {proc.returncode}.\n{describe_logs(run_dir, output)}")
    return FederationRun(proc.returncode, output, run_dir)
