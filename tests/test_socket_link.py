"""The socket link on loopback, real processes: the same numbers as torch RPC, and a stranger's
key refused at the handshake (the whole attack set, strangers' and a hostile participant's, is
``tests/test_hostile.py``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from test_federation import merged_weights, write_config

from flglm.jobs.edge_processes import EdgeFederation

pytestmark = pytest.mark.multiprocess

TIMEOUT_S = 240.0


def test_the_socket_link_gives_the_same_losses_and_weights_as_torch_rpc(finished_one_client_run: tuple[Path, Path], tmp_path: Path) -> None:
    # Prepare: the session's run over torch RPC (one encrypted client, 3 epochs: a re-key
    # handshake each, one thread per process), and the same federation over the socket link
    config, rpc = finished_one_client_run
    runs = {"rpc": rpc, "socket": tmp_path / "socket"}
    deadline = time.monotonic() + TIMEOUT_S

    # Execute
    with EdgeFederation(config, [], num_clients=1, run_dir=runs["socket"]) as federation:
        federation.start_server(timeout_s=TIMEOUT_S)
        federation.start_client(0)
        federation.wait_all(deadline=deadline)

    # Assert: bit for bit
    losses = {k: json.loads((d / "client0" / "metrics.json").read_text())["losses"] for k, d in runs.items()}
    assert len(losses["rpc"]) == 24 and losses["rpc"] == losses["socket"]
    a, b = merged_weights(runs["rpc"]), merged_weights(runs["socket"])
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
    summary = json.loads((runs["socket"] / "summary.json").read_text())
    assert summary["link"]["encrypted"] and summary["link"]["rejected_messages"] == 0
    assert summary["edge"]["proven_connections"] == 1 and summary["edge"]["malformed_frames"] == 0


def test_a_stranger_is_refused_at_the_handshake_and_counted(tmp_path: Path) -> None:
    # Prepare: the server lists a stranger's key as client 0's, so the real client 0 is the stranger
    from flglm.crypto.keys import generate_identity

    config = write_config(tmp_path)
    keys = tmp_path / "keys"
    (keys / "client0.pub").unlink()
    generate_identity(tmp_path / "other.key")
    (keys / "client0.pub").write_text((tmp_path / "other.pub").read_text())
    deadline = time.monotonic() + 120

    # Execute
    with EdgeFederation(config, ["server.startup_timeout_s=20", "federation.max_retries=0"], num_clients=1, run_dir=tmp_path / "run") as federation:
        federation.start_server(timeout_s=60)
        client = federation.start_client(0)
        code = federation.wait(client, timeout_s=max(1.0, deadline - time.monotonic()))
        log = client.output.read_text()
        server_log = (tmp_path / "run" / "logs" / "server.log").read_text()

    # Assert: the client fails with the server's reason; the server logged the refusal
    assert code != 0 and "client key not allowed" in log
    assert "refused at the handshake" in server_log
