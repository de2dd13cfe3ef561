"""Checkpoint and resume: a federation killed mid-run and restarted ends exactly as an uninterrupted one."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_encrypted_link import _model, _train
from test_federation import merged_weights, write_config

from flglm.client.server_link import ServerLink
from flglm.config import RunConfig
from flglm.jobs.subprocesses import FederationFailed, run_federation
from flglm.resume import (
    CheckpointError,
    checkpoint_path,
    consistent_round,
    load_checkpoint,
    model_fingerprint,
    prune,
    rounds_in,
    save_atomically,
)
from flglm.server.endpoint import ServerEndpoint
from flglm.server.middle_server import MiddleServer


@pytest.fixture
def cfg(tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig], tmp_path: Path) -> RunConfig:
    return make_run_config(tiny_model_configs["llama"], "server.checkpoint_every=1", f"run_dir={tmp_path / 'run'}")


def _trained_server(cfg: RunConfig, steps: int) -> MiddleServer:
    server = MiddleServer(cfg)
    link = ServerLink(ServerEndpoint(server), client_id=0, timeout_s=30)
    _train(_model(cfg, link), link, cfg, steps=steps)
    return server


def test_a_restored_server_continues_exactly_as_the_original(cfg: RunConfig) -> None:
    # Prepare: a server after 3 steps, its checkpoint, and a fresh server restored from it
    original = _trained_server(cfg, steps=3)
    state = original.checkpoint_state(rounds=3)
    path = save_atomically(state, checkpoint_path(Path(cfg.run_dir) / "ckpt", 3, "pt"))
    restored = MiddleServer(cfg)
    restored.restore(load_checkpoint(path, expect_model=state["model"]))

    # Execute: the same step on both
    for server in (original, restored):
        link = ServerLink(ServerEndpoint(server), client_id=0, timeout_s=30)
        torch.manual_seed(0)  # the same client blocks for both
        lm = _model(cfg, link)
        ids = torch.arange(3, 12).view(1, 9)
        lm(ids, torch.ones_like(ids)).sum().backward()
        link.step(client_step=3, total_steps=8)

    # Assert: the same weights, optimizer moments and counters (1e-6: vectorised kernels may
    # round an element differently in another buffer's alignment)
    for (name, a), (_, b) in zip(original.named_params, restored.named_params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    moments_a = [v for s in original.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    moments_b = [v for s in restored.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert len(moments_a) == len(moments_b) > 0
    for a, b in zip(moments_a, moments_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert restored.stats.steps == original.stats.steps == 4
    original.close()
    restored.close()


def test_a_checkpoint_of_another_model_or_split_is_refused_by_name(cfg: RunConfig, make_run_config, tiny_model_configs) -> None:
    # Prepare: a checkpoint of this model, and the fingerprint of a model with another split
    server = _trained_server(cfg, steps=1)
    path = save_atomically(server.checkpoint_state(rounds=1), checkpoint_path(Path(cfg.run_dir) / "ckpt", 1, "pt"))
    other = make_run_config(tiny_model_configs["llama"], "split.client_head_layers=2")
    other_server = MiddleServer(other)
    expected = model_fingerprint(other, {n: list(p.shape) for n, p in other_server.named_params})

    # Execute / Assert
    with pytest.raises(CheckpointError, match=f"{path}: made for a different model or split"):
        load_checkpoint(path, expect_model=expected)
    garbage = path.with_name("round-000002.pt")
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(garbage, expect_model=expected)
    server.close()
    other_server.close()


def test_checkpoint_rounds_shared_by_every_party_decide_where_to_resume(tmp_path: Path) -> None:
    # Prepare: the server is a round ahead of one client; a half-written file is ignored
    for rounds in (2, 4, 6):
        checkpoint_path(tmp_path, rounds, "pt").write_bytes(b"x")
    (tmp_path / "round-000008.pt.tmp").write_bytes(b"half")

    # Execute / Assert
    assert rounds_in(tmp_path, "pt") == [2, 4, 6]
    assert consistent_round([2, 4, 6], [[4, 6], [2, 4]]) == 4
    assert consistent_round([6], [[4]]) is None
    prune(tmp_path, "pt", keep=2)
    assert rounds_in(tmp_path, "pt") == [4, 6]


KILL_STEP = random.Random(7).randint(3, 10)
"""A random server step to die at, fixed by seed so a failure reproduces."""


@pytest.mark.multiprocess
def test_a_federation_killed_mid_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    # Prepare: 2 encrypted clients, client-batched (a long window: every group holds both, so
    # runs are reproducible), secure FedAvg every 2 steps, a checkpoint at every round; the
    # uninterrupted run, and a run whose server is SIGKILLed right after a random step and that
    # is then started again. (Sequential serving checkpoints the same way, but with 2 clients its
    # turn order, and so the result, is not reproducible even without a crash.)
    clients, overrides = 2, ["server.parallelism=client_batching", "server.batch_window_ms=60000"]
    config = write_config(tmp_path, federation={"aggregate_every": 2}, server={"checkpoint_every": 1})
    common = ["resume=true", "trainer.max_steps=12", *overrides]
    run_federation(config, common, num_clients=clients, run_dir=tmp_path / "clean", timeout_s=240)

    # Execute
    with pytest.raises(FederationFailed):
        run_federation(
            config,
            [*common, f"faults.kill_server_at_step={KILL_STEP}", "federation.max_retries=0"],  # the clients fail at once
            num_clients=clients,
            run_dir=tmp_path / "crash",
            timeout_s=240,
        )
    killed_at = sorted(rounds_in(tmp_path / "crash" / "checkpoints" / "server", "pt"))
    run_federation(config, common, num_clients=clients, run_dir=tmp_path / "crash", timeout_s=240)

    # Assert: it did resume from a checkpoint, and losses, weights and counters equal the clean run's
    assert killed_at, "the killed run left no checkpoint"
    assert "resuming from round" in (tmp_path / "crash" / "logs" / "server.log").read_text()
    for client in range(clients):
        clean = json.loads((tmp_path / "clean" / f"client{client}" / "metrics.json").read_text())
        crash = json.loads((tmp_path / "crash" / f"client{client}" / "metrics.json").read_text())
        assert len(crash["losses"]) == len(clean["losses"])
        assert crash["losses"] == pytest.approx(clean["losses"], abs=1e-5, rel=0)
        clean_weights, crash_weights = merged_weights(tmp_path / "clean", client), merged_weights(tmp_path / "crash", client)
        for name, value in clean_weights.items():
            torch.testing.assert_close(crash_weights[name], value, atol=1e-5, rtol=0, msg=name)
    clean_summary = json.loads((tmp_path / "clean" / "summary.json").read_text())["server"]
    crash_summary = json.loads((tmp_path / "crash" / "summary.json").read_text())["server"]
    for key in ("steps", "forwards", "backwards", "aggregation_rounds"):
        assert crash_summary[key] == clean_summary[key], key
