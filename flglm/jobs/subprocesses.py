"""Start a whole federation on this machine as child processes (demo, tests, benchmarks).

torchrun ``--standalone`` picks a free port itself, so runs never collide. The children run
in their own process group with a hard timeout: on timeout or error every process of the
group is killed and the error carries the tail of each process's log.

:class:`DynamicFederation` starts the processes of a ``federation.membership=dynamic``
federation one by one instead (no torchrun), so a test can kill one client and start it again
while the others go on; the server's store takes a free port (``MASTER_PORT=0``) and says which.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from flglm.run_dirs import first_error
from flglm.run_layout import rendezvous_path

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO_ROOT / "launch" / "train.py"
GENERATE_SCRIPT = REPO_ROOT / "launch" / "generate.py"


class FederationFailed(RuntimeError):
    """A federation run exited non-zero or timed out; the message holds its logs."""


@dataclass
class FederationRun:
    returncode: int
    output: str
    run_dir: Path | None


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _logs(run_dir: Path | None) -> list[Path]:
    if run_dir is None:
        return []
    return sorted([*(run_dir / "logs").glob("*.log"), *(run_dir / "logs").glob("*.out")])


def log_sizes(run_dir: Path | None) -> dict[Path, int]:
    """Each log's size now: what a later attempt appends starts there (logs are appended to)."""
    return {log: log.stat().st_size for log in _logs(run_dir)}


def describe_logs(run_dir: Path | None, output: str, *, since: dict[Path, int] | None = None) -> str:
    """torchrun's output and the tail of each log; with ``since`` (from :func:`log_sizes`), only
    what this attempt wrote: an earlier run's logs in the same directory are left out."""
    parts = [f"--- torchrun output (tail) ---\n{output[-6000:]}"] if output else []
    for log in _logs(run_dir):
        start = (since or {}).get(log, 0)
        try:
            with log.open("rb") as handle:
                handle.seek(start)
                text = handle.read().decode(errors="replace")
        except OSError:
            text = "(no log)"
        if since is not None and not text:
            continue
        parts.append(f"--- {log.name} (tail) ---\n{_tail(text)}")
    return "\n".join(parts)


def failure_message(script: str | Path, returncode: int, run_dir: Path | None, output: str, *, started: float, since: dict[Path, int]) -> str:
    """The first error a process of this attempt recorded, once, with where its traceback is;
    without one (a crash, a kill), the attempt's output and logs."""
    first = first_error(run_dir, since=started) if run_dir is not None else None
    if first is None:
        return f"{Path(script).name} exited with {returncode}.\n{describe_logs(run_dir, output, since=since)}"
    assert run_dir is not None
    return f"{first.line()}\n(traceback in {run_dir / 'logs' / (first.process + '.log')}; {Path(script).name} exited with {returncode})"


def _this_checkout_first(pythonpath: str | None) -> str:
    """PYTHONPATH with this checkout first: a script's own directory, not the repository root,
    starts ``sys.path``, so without it the children would import whichever checkout is installed
    (another git worktree, say) instead of the code that started them."""
    return os.pathsep.join([str(REPO_ROOT), *([pythonpath] if pythonpath else [])])


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

    Raises FederationFailed on timeout or a non-zero exit: with the first error a process
    recorded (``flglm.run_dirs``), else with the output and what this attempt wrote to the logs
    under ``run_dir/logs``. ``stream`` echoes the output (progress bars, logs) while it runs.
    """
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
        str(script), *args,
    ]  # fmt: skip
    env = dict(os.environ)
    env.update(extra_env or {})
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PYTHONPATH"] = _this_checkout_first(env.get("PYTHONPATH"))
    since, started = log_sizes(run_dir), time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        output = _echo(proc, timeout_s) if stream else proc.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        output, _ = proc.communicate(timeout=30)
        raise FederationFailed(
            f"{Path(script).name} did not finish within {timeout_s:.0f}s; killed.\n{describe_logs(run_dir, output or '', since=since)}"
        ) from None
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    if proc.returncode != 0:
        raise FederationFailed(failure_message(script, proc.returncode, run_dir, output, started=started, since=since))
    return FederationRun(proc.returncode, output, run_dir)


def sub_server_overrides(sub_servers: int, overrides: Sequence[str]) -> list[str]:
    """``overrides`` after what ``sub_servers > 1`` needs: the count, and ``server.parallelism=hierarchical`` unless they say ``auto``."""
    if sub_servers <= 1:
        return list(overrides)
    mode = [] if any(o.startswith("server.parallelism=") for o in overrides) else ["server.parallelism=hierarchical"]
    return [f"server.sub_servers={sub_servers}", *mode, *overrides]


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
    args += sub_server_overrides(sub_servers, overrides)
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


@dataclass
class FederationProcess:
    """One process of a :class:`DynamicFederation`; its output goes to ``output``."""

    name: str
    popen: subprocess.Popen
    output: Path


class ProcessGroup:
    """Processes of one federation started on their own (not by torchrun), killed together on exit
    from the context: what :class:`DynamicFederation` and the socket link's federations share."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.processes: list[FederationProcess] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.kill_all()

    def wait(self, process: FederationProcess, *, timeout_s: float) -> int:
        """``process``'s exit code; on timeout every process is killed and FederationFailed carries the logs."""
        try:
            return process.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise FederationFailed(f"{process.name} did not finish within {timeout_s:.0f}s; killed.\n{self.describe()}") from None

    def wait_all(self, *, deadline: float) -> dict[str, int]:
        """Every process's exit code, waiting until ``deadline`` (``time.monotonic()``) at most;
        FederationFailed, with every log, if one exits non-zero or time runs out."""
        codes = {p.name: self.wait(p, timeout_s=max(1.0, deadline - time.monotonic())) for p in self.processes}
        if any(codes.values()):
            raise FederationFailed(f"exit codes {codes}.\n{self.describe()}")
        return codes

    def kill_all(self) -> None:
        """SIGKILL every process (and its children) still running."""
        for process in self.processes:
            if process.popen.poll() is None:
                kill_tree(process.popen.pid)
                process.popen.wait(timeout=10)

    def describe(self) -> str:
        """Exit codes and the tail of every log, for a failure message."""
        codes = ", ".join(f"{p.name} (pid {p.popen.pid}): {p.popen.poll()}" for p in self.processes)
        return f"exit codes: {codes}\n" + describe_logs(self.run_dir, "")


class DynamicFederation(ProcessGroup):
    """The processes of a dynamic federation (``federation.membership=dynamic``), each started
    on its own: the server (rank 0, hosting the rendezvous store on a free port), then clients,
    any of which may be killed and started again. Use as a context manager: on exit every
    process still running is killed.

    Args:
        config: the federation's YAML file.
        overrides: ``key=value`` overrides for every process.
        num_clients: clients of the federation (ranks 1..num_clients).
        run_dir: the run's directory (logs under ``run_dir/logs``).
        extra_env: more environment variables for every process.
    """

    def __init__(
        self,
        config: str | Path,
        overrides: Sequence[str] = (),
        *,
        num_clients: int,
        run_dir: str | Path,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(run_dir)
        self.num_clients = num_clients
        self._args = [
            "--config", str(config), f"run_dir={self.run_dir}", f"federation.num_clients={num_clients}",
            "federation.membership=dynamic", *overrides,
        ]  # fmt: skip
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
        self._env.update(extra_env or {})
        self._env.setdefault("PYTHONUNBUFFERED", "1")
        self._env["PYTHONPATH"] = _this_checkout_first(self._env.get("PYTHONPATH"))
        world = str(num_clients + 1)
        self._env.update({"WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world, "MASTER_ADDR": "127.0.0.1"})
        self._port: int | None = None

    def _start(self, name: str, rank: int, port: int, overrides: Sequence[str]) -> FederationProcess:
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        output = logs / f"{name}-{sum(p.name == name for p in self.processes)}.out"
        env = dict(self._env, RANK=str(rank), LOCAL_RANK=str(rank), MASTER_PORT=str(port))
        with output.open("w") as out:
            popen = subprocess.Popen(
                [sys.executable, str(TRAIN_SCRIPT), *self._args, *overrides],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        process = FederationProcess(name, popen, output)
        self.processes.append(process)
        return process

    def start_server(self, overrides: Sequence[str] = (), *, timeout_s: float) -> FederationProcess:
        """Start the server and wait (at most ``timeout_s``) until its store's port is known."""
        path = rendezvous_path(self.run_dir)
        path.unlink(missing_ok=True)
        server = self._start("server", 0, 0, overrides)
        deadline = time.monotonic() + timeout_s
        while not path.is_file():
            if server.popen.poll() is not None or time.monotonic() > deadline:
                self.kill_all()
                raise FederationFailed(f"the server published no rendezvous address ({path}).\n{self.describe()}")
            time.sleep(0.1)
        self._port = int(json.loads(path.read_text())["master_port"])
        return server

    def start_client(self, index: int, overrides: Sequence[str] = (), *, server_port: int | None = None) -> FederationProcess:
        """Start (or start again) client ``index``; the server must be running (or its store
        named by ``server_port``)."""
        port = server_port if server_port is not None else self._port
        if port is None:
            raise RuntimeError("start the server first")
        if not 0 <= index < self.num_clients:
            raise ValueError(f"client {index} is not one of the federation's clients 0..{self.num_clients - 1}")
        return self._start(f"client{index}", index + 1, port, overrides)
