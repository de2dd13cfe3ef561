"""Who may start on a run directory, and how a failed process reports why.

A run_dir holding ``summary.json`` (written last, by the server, when a federation finished)
is a finished run: a new start there is refused before any process writes a byte, unless
``resume=true`` (continue from its checkpoints) or ``overwrite=true`` (the old run is renamed
to ``RUN_DIR.old-<UTC time>``, whole; nothing is deleted). A run_dir without it (a failed or
unfinished run) is reused: its logs are appended to, its checkpoints kept for ``resume``.

A failing process writes its error to ``logs/<process>.error.json`` (and the traceback to its
own log) and prints one line; the launcher reads the first error of its own attempt and
reports it once. Light on purpose (no torch): the CLI checks before importing the jobs.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from flglm.config import RunConfig, to_yaml
from flglm.run_layout import summary_path


class RunDirError(RuntimeError):
    """A run cannot start on this run_dir (it holds a finished run)."""


def finished(run_dir: str | Path) -> bool:
    """A federation finished in ``run_dir`` (its summary is the last file it writes)."""
    return summary_path(run_dir).is_file()


def check_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a fresh start on a finished run, naming the ways out."""
    if finished(run_dir) and not resume and not overwrite:
        raise RunDirError(
            f"run_dir {run_dir} holds a finished run ({summary_path(run_dir)}); nothing was changed. "
            "Choose another run_dir, continue it with resume=true, or move it aside with overwrite=true "
            f"(renamed to {run_dir}.old-<time>)"
        )


def move_aside(run_dir: str | Path) -> Path:
    """Rename a finished ``run_dir`` to ``RUN_DIR.old-<UTC time>`` (a rename: every byte kept)."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    suffix = 0
    while target.exists():
        suffix += 1
        target = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{suffix}")
    os.rename(run_dir, target)
    return target


def wait_until_moved(run_dir: str | Path, *, timeout_s: float) -> None:
    """Wait for the process that moves a finished run aside (``overwrite=true``) to have done it."""
    deadline = time.monotonic() + timeout_s
    while finished(run_dir):
        if time.monotonic() > deadline:
            raise RunDirError(f"overwrite=true: {run_dir} was not moved aside within {timeout_s:.0f}s (by the local rank 0 process)")
        time.sleep(0.05)


@dataclass(frozen=True)
class ProcessError:
    """The error a federation process died of."""

    process: str
    rank: int
    kind: str
    message: str
    time: float

    def line(self) -> str:
        return f"{self.process} (rank {self.rank}): {self.kind}: {self.message}"


def error_path(run_dir: str | Path, process: str) -> Path:
    return Path(run_dir) / "logs" / f"{process}.error.json"


def record_error(run_dir: str | Path, process: str, rank: int, error: BaseException) -> ProcessError:
    """Write ``error`` to ``logs/<process>.error.json`` (atomically) and return it."""
    record = ProcessError(process, rank, type(error).__name__, str(error), time.time())
    path = error_path(run_dir, process)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    payload = {**record.__dict__, "traceback": "".join(traceback.format_exception(error))}
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return record


def first_error(run_dir: str | Path, *, since: float) -> ProcessError | None:
    """The earliest error recorded in ``run_dir/logs`` at or after ``since`` (this attempt's), or None."""
    found = []
    for path in (Path(run_dir) / "logs").glob("*.error.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("time", 0.0) >= since:
            found.append(ProcessError(data["process"], data["rank"], data["kind"], data["message"], data["time"]))
    return min(found, key=lambda e: e.time) if found else None


def save_run_config(cfg: RunConfig, directory: str | Path | None = None) -> None:
    """Write ``config.yaml`` (what ``flglm generate`` reads) into ``directory`` (default ``run_dir``)
    atomically: old file or new, never half."""
    path = Path(directory if directory is not None else cfg.run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, path)
