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
