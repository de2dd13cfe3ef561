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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "launch" / "train.py"
GENERATE_SCRIPT = REPO_ROOT / "launch" / "generate.py"


class FederationFailed(RuntimeError):
    """A federation run exited non-zero or timed out; the message holds its logs."""


@dataclass
class FederationRun:
    returncode: int
    output: str
    run_dir: Path | None


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def describe_logs(run_dir: Path | None, output: str) -> str:
    parts = [f"--- torchrun output (tail) ---\n{output[-6000:]}"]
    logs = sorted((run_dir / "logs").glob("*.log")) if run_dir is not None else []
    for log in logs:
        parts.append(f"--- {log.name} (tail) ---\n{_tail(log)}")
    return "\n".join(parts)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun puts its workers in new sessions,
    so killing its process group is not enough)."""
    import psutil

    try:
        root = psutil.Process(pid)
        victims = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)


def _echo(proc: subprocess.Popen, timeout_s: float) -> str:
    """Copy the child's output to our stdout as it comes; raise TimeoutExpired past the deadline."""
    import threading

    chunks: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            chunks.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    proc.wait(timeout=timeout_s)
    reader.join(timeout=5)
    return "".join(chunks)


def run_torchrun(
    script: str | Path,
    args: Sequence[str],
    *,
    nproc: int,
    timeout_s: float,
    run_dir: Path | None = None,
    extra_env: dict[str, str] | None = None,
    stream: bool = False,
    max_restarts: int = 0,
) -> FederationRun:
    """Run ``script`` in ``nproc`` processes under torchrun (free port); kill them all on timeout.

    ``max_restarts``: torchrun restarts all processes this many times after one fails.

    Raises FederationFailed with the output (and the logs under ``run_dir/logs``) on timeout
    or a non-zero exit. ``stream`` echoes the output (progress bars, logs) while it runs.
    """
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
        str(script), *args,
    ]  # fmt: skip
    env = dict(os.environ)
    env.update(extra_env or {})
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output = _echo(proc, timeout_s) if stream else proc.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        output, _ = proc.communicate(timeout=30)
        raise FederationFailed(
            f"{Path(script).name} did not finish within {timeout_s:.0f}s; killed.\n{describe_logs(run_dir, output or '')}"
        ) from None
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    if proc.returncode != 0:
        raise FederationFailed(f"{Path(script).name} exited with {proc.returncode}.\n{describe_logs(run_dir, output)}")
    return FederationRun(proc.returncode, output, run_dir)


def run_federation(
    config: str | Path,
    overrides: Sequence[str] = (),
    *,
    num_clients: int,
    run_dir: str | Path,
    timeout_s: float,
    sub_servers: int = 1,
    extra_env: dict[str, str] | None = None,
    stream: bool = False,
    max_restarts: int = 0,
) -> FederationRun:
    """Run a federation: ``sub_servers + num_clients`` processes of ``launch/train.py``, and wait.

    ``sub_servers > 1`` runs a hierarchical server (``server.parallelism=hierarchical`` unless the
    overrides say ``auto``)."""
    run_dir = Path(run_dir)
    args = ["--config", str(config), f"run_dir={run_dir}", f"federation.num_clients={num_clients}"]
    if sub_servers > 1:
        args += [f"server.sub_servers={sub_servers}"]
        if not any(o.startswith("server.parallelism=") for o in overrides):
            args += ["server.parallelism=hierarchical"]
    args += list(overrides)
    return run_torchrun(
        TRAIN_SCRIPT,
        args,
        nproc=num_clients + sub_servers,
        timeout_s=timeout_s,
        run_dir=run_dir,
        extra_env=extra_env,
        stream=stream,
        max_restarts=max_restarts,
    )
