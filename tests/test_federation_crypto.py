"""Encrypted federations on loopback: lossless, and strangers are refused before any data is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_federation import merged_weights, write_config

from flglm.crypto.keys import generate_identity
from flglm.jobs.subprocesses import FederationFailed, run_federation

pytestmark = pytest.mark.multiprocess


def test_encryption_on_and_off_give_identical_losses_and_weights(tmp_path: Path) -> None:
    # Prepare: 3 epochs of 8 steps, so the clients re-key twice (a new handshake per epoch)
    config = write_config(tmp_path, data={"max_train_rows": 64}, trainer={"max_epochs": 3, "max_steps": -1})
    runs = {"on": tmp_path / "on", "off": tmp_path / "off"}

    # Execute
    run_federation(config, ["crypto.enabled=true"], num_clients=1, run_dir=runs["on"], timeout_s=240)
    run_federation(config, ["crypto.enabled=false"], num_clients=1, run_dir=runs["off"], timeout_s=240)

    # Assert: the same numbers, bit for bit
    losses = {k: json.loads((d / "client0" / "metrics.json").read_text())["losses"] for k, d in runs.items()}
    assert len(losses["on"]) == 24 and losses["on"] == losses["off"]
    on, off = merged_weights(runs["on"]), merged_weights(runs["off"])
    assert sorted(on) == sorted(off)
    for name in on:
        assert torch.equal(on[name], off[name]), name
    links = {k: json.loads((d / "summary.json").read_text())["link"] for k, d in runs.items()}
    assert links["on"]["encrypted"] and not links["off"]["encrypted"]
    assert links["on"]["handshakes"] >= 3  # start + 2 epochs (+1 after teardown for the final validation)
    assert links["on"]["rejected_messages"] == 0
    assert links["on"]["wire_bytes_in"] > links["off"]["wire_bytes_in"]  # headers and tags


@pytest.mark.parametrize(
    ("replaced", "message"),
    [("client0.pub", "client key not allowed"), ("server.pub", "does not match the pinned key")],
    ids=["unknown-client", "wrong-server-pin"],
)
def test_strangers_are_refused_at_the_handshake_before_data_is_read(tmp_path: Path, replaced: str, message: str) -> None:
    # Prepare: the server's list of clients (or the client's server pin) holds a stranger's key,
    # and the training file does not exist: the handshake must fail first.
    config = write_config(tmp_path)
    keys = tmp_path / "keys"
    (keys / replaced).unlink()
    generate_identity(tmp_path / "stranger.key")
    (keys / replaced).write_text((tmp_path / "stranger.pub").read_text())
    missing = tmp_path / "nowhere" / "train.tsv"

    # Execute
    with pytest.raises(FederationFailed) as failure:
        run_federation(config, [f"data.train_path={missing}"], num_clients=1, run_dir=tmp_path / "run", timeout_s=120)

    # Assert
    assert message in str(failure.value)
    assert "No such file" not in str(failure.value) and "does not exist" not in str(failure.value)
    assert not (tmp_path / "run" / "client0" / "client_blocks.safetensors").exists()
