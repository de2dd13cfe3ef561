"""Split == whole model over real RPC between two processes, for every supported architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_MODEL_CONFIGS

from flglm.jobs.subprocesses import run_torchrun

pytestmark = pytest.mark.multiprocess

WORKER = Path(__file__).parent / "workers" / "rpc_split_check.py"


def test_split_over_rpc_equals_whole_model_for_every_architecture() -> None:
    run = run_torchrun(WORKER, [], nproc=2, timeout_s=180)

    results = json.loads([line for line in run.output.splitlines() if line.startswith("{")][-1])
    assert "configuration differs" in results.pop("refused_join")  # the server's error, raised on the client
    assert set(results) == set(TINY_MODEL_CONFIGS)
    for arch, diff in results.items():
        assert diff["logits"] <= 1e-5, (arch, diff)
        assert diff["grads"] <= 1e-5, (arch, diff)
