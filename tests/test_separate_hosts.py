"""Federations across separate network hosts (``tests/netns.py``): the server on one namespace host,
each client on its own, over the socket link through a rate-limited veth link. Real processes and
sockets; every namespace removed on any exit path."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from flglm.network_hosts import NetworkHosts, available
from test_federation import merged_weights, write_config
from test_socket_link import TIMEOUT_S, _finish

from flglm.jobs.edge_processes import EdgeFederation

AVAILABLE, WHY = available()
pytestmark = [pytest.mark.multiprocess, pytest.mark.skipif(not AVAILABLE, reason=f"no network namespaces here: {WHY}")]


def test_a_client_on_another_host_trains_exactly_as_on_the_servers_host(tmp_path: Path) -> None:
    # Prepare: one encrypted client, 2 epochs, float32 wire; the client's host link limited to 100 Mbit/s.
    config = write_config(tmp_path, data={"max_train_rows": 64}, trainer={"max_epochs": 2, "max_steps": -1})
    common = ["crypto.enabled=true", "server.num_threads=1"]
    runs = {"one host": tmp_path / "loopback", "two hosts": tmp_path / "hosts"}
    deadline = time.monotonic() + TIMEOUT_S

    # Execute
    with EdgeFederation(config, common, num_clients=1, run_dir=runs["one host"]) as federation:
        federation.start_server(timeout_s=TIMEOUT_S)
        federation.start_client(0)
        _finish(federation, deadline=deadline)
    with NetworkHosts(["server", "client0"], rate_mbit={"client0": 100}) as hosts, EdgeFederation(
        config, common, num_clients=1, run_dir=runs["two hosts"]
    ) as federation:
        server, client = hosts["server"], hosts["client0"]
        federation.start_server([f"link.edge_host={server.address}"], timeout_s=TIMEOUT_S, prefix=server.command([]))
        assert federation.address is not None and federation.address[0] == server.address
        federation.start_client(0, [f"link.edge_host={server.address}"], prefix=client.command([]))  # one config for all
        _finish(federation, deadline=deadline)

    # Assert: the client reached the server's address from its own host, and nothing changed the numbers.
    summary = json.loads((runs["two hosts"] / "summary.json").read_text())
    assert summary["edge"]["proven_connections"] == 1 and summary["link"]["rejected_messages"] == 0
    losses = {k: json.loads((d / "client0" / "metrics.json").read_text())["losses"] for k, d in runs.items()}
    assert len(losses["one host"]) == 16 and losses["one host"] == losses["two hosts"]
    a, b = merged_weights(runs["one host"]), merged_weights(runs["two hosts"])
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
