"""Where a process of a federation logs: stderr and its own file under ``run_dir/logs``.

Its own module (no Lightning) so that every process, the server's too, sets it up cheaply.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging(run_dir: Path, name: str) -> logging.Logger:
    """Log to stderr and to ``run_dir/logs/<name>.log`` (appended: an earlier attempt's lines stay);
    return a logger that writes to the file only (a failure's traceback goes there, not to stderr)."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [{name}] %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    file_handler = logging.FileHandler(run_dir / "logs" / f"{name}.log")
    for handler in (logging.StreamHandler(sys.stderr), file_handler):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    file_only = logging.getLogger(f"flglm.file.{name}")
    file_only.propagate = False
    file_only.addHandler(file_handler)
    return file_only


def report_failure(run_dir: Path, process: str, rank: int, err: Exception, file_log: logging.Logger) -> int:
    """A failed process: its error to ``logs/<process>.error.json`` (the launcher reports the
    first one), the traceback to its log file, one line to stderr (under a bare torchrun, each
    failing process prints its own line); exit code 1."""
    from flglm.run_dirs import record_error

    record = record_error(run_dir, process, rank, err)
    file_log.error("failed: %s", record.line(), exc_info=err)
    print(f"flglm: error: {record.line()} (traceback in {run_dir / 'logs' / (process + '.log')})", file=sys.stderr)
    return 1
