"""Federations across separate network hosts (:mod:`flglm.network_hosts`): the server (or each
sub-server) on its own namespace host, each client on its own, over the socket link through a
rate-limited veth link. Real processes and sockets; every namespace removed on any exit path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_federation import merged_weights, write_config
from test_socket_link import TIMEOUT_S

from flglm.jobs.edge_processes import EdgeFederation, ServerNode
from flglm.jobs.hostile import listening_sockets
from flglm.jobs.subprocesses import REPO_ROOT, run_federation
from flglm.network_hosts import NetworkHosts, available
from flglm.tensor_files import load_tensors

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
        federation.wait_all(deadline=deadline)
    with (
        NetworkHosts(["server", "client0"], rate_mbit={"client0": 100}) as hosts,
        EdgeFederation(config, common, num_clients=1, run_dir=runs["two hosts"]) as federation,
    ):
        server, client = hosts["server"], hosts["client0"]
        federation.start_server([f"link.edge_host={server.address}"], timeout_s=TIMEOUT_S, prefix=server.command([]))
        assert federation.address is not None and federation.address[0] == server.address
        federation.start_client(0, [f"link.edge_host={server.address}"], prefix=client.command([]))  # one config for all
        federation.wait_all(deadline=deadline)

    # Assert: the client reached the server's address from its own host, and nothing changed the numbers.
    summary = json.loads((runs["two hosts"] / "summary.json").read_text())
    assert summary["edge"]["proven_connections"] == 1 and summary["link"]["rejected_messages"] == 0
    losses = {k: json.loads((d / "client0" / "metrics.json").read_text())["losses"] for k, d in runs.items()}
    assert len(losses["one host"]) == 16 and losses["one host"] == losses["two hosts"]
    a, b = merged_weights(runs["one host"]), merged_weights(runs["two hosts"])
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_two_sub_servers_and_two_clients_on_four_hosts_train_as_on_one_host(tmp_path: Path) -> None:
    # Prepare: 2 encrypted clients (secure aggregation on), no clipping (the server's step goes
    # with each backward), FedAvg every step; hierarchical: sub-server i serves client i.
    config = write_config(tmp_path, data={"max_train_rows": 64}, trainer={"max_epochs": 1, "max_steps": -1, "gradient_clip_val": None})
    common = ["crypto.enabled=true", "server.num_threads=1", "server.parallelism=hierarchical"]
    runs = {"one host": tmp_path / "loopback", "four hosts": tmp_path / "hosts"}
    deadline = time.monotonic() + TIMEOUT_S

    # Execute: the torch-RPC federation on loopback, then the socket-link one across four hosts,
    # the two sub-servers started on their own (`--sub-server/--cluster`), their store and
    # collectives on a network of their own; before the clients start, a stranger on a fifth
    # host tries every port the sub-servers listen on, at each of their addresses.
    run_federation(config, common, num_clients=2, sub_servers=2, run_dir=runs["one host"], timeout_s=TIMEOUT_S)
    names = ["server0", "server1", "client0", "client1", "attacker"]
    with (
        NetworkHosts(names, rate_mbit={"client0": 100, "client1": 100}, cluster=names[:2]) as hosts,
        EdgeFederation(config, [*common, "server.sub_servers=2"], num_clients=2, run_dir=runs["four hosts"]) as federation,
    ):
        nodes = [ServerNode(hosts[n].address, hosts[n].command([]), cluster_address=hosts[n].cluster_address) for n in names[:2]]
        servers = federation.start_sub_servers(nodes, master_port=29500, timeout_s=TIMEOUT_S)
        assert [a[0] for a in federation.addresses] == [hosts["server0"].address, hosts["server1"].address]
        bound = {n: listening_sockets(s.popen.pid) for n, s in zip(names[:2], servers)}
        targets = [
            f"{a}:{port}" for n in names[:2] for port in sorted({p for _, p in bound[n]}) for a in (hosts[n].address, hosts[n].cluster_address)
        ]
        probe = subprocess.run(
            hosts["attacker"].command([sys.executable, "-m", "flglm.jobs.hostile", "reach", *targets]),
            check=False, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr[-3000:]
        for client in (0, 1):
            federation.start_client(client, prefix=hosts[f"client{client}"].command([]))
        federation.wait_all(deadline=deadline)

    # Assert: the stranger reached the two edges and nothing else (the store and gloo listen on
    # the cluster addresses only, out of its reach); no store took its write
    edges = {f"{a}:{p}" for a, p in federation.addresses}
    reached = json.loads(probe.stdout.splitlines()[-1])
    assert set(reached["connected"]) == edges and reached["stores_writable"] == []
    clusters = {hosts[n].cluster_address for n in names[:2]}
    internal = {a for n in names[:2] for a, p in bound[n] if f"{a}:{p}" not in edges}
    assert internal == clusters and any(p == 29500 for _, p in bound["server0"]), bound

    # ... and each client reached its own sub-server from its own host; one middle stack, the
    # same client blocks everywhere, bit for bit as on one host.
    summary = json.loads((runs["four hosts"] / "summary.json").read_text())
    assert summary["parallelism"]["mode"] == "hierarchical" and [s["clients"] for s in summary["sub_servers"]] == [["0"], ["1"]]
    assert [s["edge"]["proven_connections"] for s in summary["sub_servers"]] == [1, 1]
    assert summary["link"]["rejected_messages"] == 0 and summary["link"]["round_trips_per_step"] == 2.0
    sub_servers = [s["server"] for s in summary["sub_servers"]]
    assert sub_servers[0]["middle_sha256"] == sub_servers[1]["middle_sha256"]
    blocks = {k: [load_tensors(d / f"client{c}" / "client_blocks.safetensors") for c in (0, 1)] for k, d in runs.items()}
    for run, (first, second) in blocks.items():
        assert sorted(first) == sorted(second) and all(torch.equal(first[n], second[n]) for n in first), run
    a, b = merged_weights(runs["one host"]), merged_weights(runs["four hosts"])
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
