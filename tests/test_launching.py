"""The multi-process harness never hangs: a stuck run is killed at its deadline, with its log."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from flglm.jobs.subprocesses import FederationFailed, run_torchrun

pytestmark = pytest.mark.multiprocess

HANG = Path(__file__).parent / "workers" / "hang.py"


def _alive(script: Path) -> bool:
    return subprocess.run(["pgrep", "-f", str(script)], capture_output=True).returncode == 0


def test_a_hanging_run_is_killed_at_its_deadline_and_reports_its_output() -> None:
    started = time.monotonic()

    with pytest.raises(FederationFailed) as failure:
        run_torchrun(HANG, [], nproc=2, timeout_s=8)

    assert time.monotonic() - started < 60
    assert "did not finish within 8s" in str(failure.value)
    assert "worker started, now hanging" in str(failure.value)
    time.sleep(1)
    assert not _alive(HANG), "a child process outlived the run"
