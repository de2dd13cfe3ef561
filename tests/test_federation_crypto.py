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


def test_encryption_on_and_off_give_identical_losses_and_weights(finished_one_client_run: tuple[Path, Path], tmp_path: Path) -> None:
    # Prepare: the session's encrypted run (3 epochs of 8 steps, so the client re-keyed twice: a
    # new handshake per epoch), and the same federation in the clear
    config, encrypted = finished_one_client_run
    runs = {"on": encrypted, "off": tmp_path / "off"}

    # Execute
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
    # and the training file is there but unreadable (no 'sentence' column): the handshake must
    # fail first, before the file is read.
    config = write_config(tmp_path)
    keys = tmp_path / "keys"
    (keys / replaced).unlink()
    generate_identity(tmp_path / "stranger.key")
    (keys / replaced).write_text((tmp_path / "stranger.pub").read_text())
    unreadable = tmp_path / "unreadable.tsv"
    unreadable.write_text("text\tlabel\nfine\t1\n")

    # Execute
    with pytest.raises(FederationFailed) as failure:
        run_federation(config, [f"data.train_path={unreadable}"], num_clients=1, run_dir=tmp_path / "run", timeout_s=120)

    # Assert
    assert message in str(failure.value)
    assert str(unreadable) not in str(failure.value) and "sentence" not in str(failure.value)
    assert not (tmp_path / "run" / "client0" / "client_blocks.safetensors").exists()
