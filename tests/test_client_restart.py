"""A client killed mid-round: the others finish, the server frees what the dead process left, and the
client, started again, joins and finishes (real processes on loopback; a dynamic torch-RPC
federation, and the socket link, where every client is a process of its own anyway)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from test_federation import write_config

from flglm.jobs.edge_processes import EdgeFederation
from flglm.jobs.subprocesses import DynamicFederation, FederationFailed, ProcessGroup

pytestmark = pytest.mark.multiprocess

STEPS = 9
"""Optimizer steps of each client (FedAvg every 3: rounds 0, 1 and 2)."""
KILL_AFTER = 4
"""Client 2 dies in its step 5 (after round 0): its forward has reached the server, its backward never does."""
TIMEOUT_S = 85.0
"""Hard limit on the whole federation; every process is killed past it."""


def _wait_for_line(federation: ProcessGroup, path: Path, text: str, *, deadline: float) -> None:
    while not (path.is_file() and text in path.read_text(errors="replace")):
        if time.monotonic() > deadline:
            federation.kill_all()
            raise FederationFailed(f"{path.name} never said {text!r}.\n{federation.describe()}")
        time.sleep(0.2)


@pytest.mark.parametrize("transport", ["rpc", "socket"])
def test_a_killed_client_is_dropped_the_others_finish_and_it_rejoins_and_finishes(tmp_path: Path, transport: str) -> None:
    # Prepare: a server and 3 encrypted clients (secure FedAvg every 3 steps), each process started
    # on its own (a free port for the server's store); client 2 SIGKILLs itself in the middle of a
    # step; a silent client is dropped after 6 s, and may join again within 60 s of its drop
    config = write_config(tmp_path, federation={"aggregate_every": 3})
    run_dir, logs = tmp_path / "run", tmp_path / "run" / "logs"
    common = [
        f"trainer.max_steps={STEPS}", "server.client_timeout_s=6", "server.rejoin_timeout_s=60",
        "server.startup_timeout_s=60", "server.rpc_timeout_s=30", "federation.max_retries=1",
    ]  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_S

    def remaining() -> float:
        return max(1.0, deadline - time.monotonic())

    group: DynamicFederation | EdgeFederation = (
        DynamicFederation(config, common, num_clients=3, run_dir=run_dir)
        if transport == "rpc"
        else EdgeFederation(config, [*common, "server.num_threads=1"], num_clients=3, run_dir=run_dir)  # its server: one thread, as here
    )
    with group as federation:
        # Execute: start everyone; once client 2 is dead and dropped, start it again; wait for all
        server = federation.start_server(timeout_s=remaining())
        survivors = [federation.start_client(i) for i in (0, 1)]
        doomed = federation.start_client(2, [f"faults.kill_client_at_step={KILL_AFTER}", "faults.kill_client=2"])
        killed_with = federation.wait(doomed, timeout_s=remaining())
        _wait_for_line(federation, logs / "server.log", "client 2 dropped from the federation", deadline=deadline)
        restarted = federation.start_client(2)
        waited = {"client0": survivors[0], "client1": survivors[1], "client2 again": restarted, "server": server}
        codes = {name: federation.wait(process, timeout_s=remaining()) for name, process in waited.items()}

        # Assert: client 2 died by SIGKILL; everyone else, the restarted client 2 too, exited 0
        assert killed_with == -9, federation.describe()
        assert set(codes.values()) == {0}, f"{codes}\n{federation.describe()}"
        server_log = (logs / "server.log").read_text()
        summary = json.loads((run_dir / "summary.json").read_text())
        # the drop is logged and counted; the forward the dead process left pending was freed
        assert summary["server"]["dropped_clients"] >= 1, federation.describe()
        assert summary["server"]["freed_pending"] >= 1, federation.describe()
        assert "client 2: freed 1 pending forward(s)" in server_log
        # clients 0 and 1 trained all their steps; client 2 joined again, at the round the
        # federation was at, and trained all of its own; every process ran one thread
        assert server_log.count("client 2 joined") == 2
        assert {c: summary["clients"][c]["steps"] for c in ("0", "1", "2")} == {"0": STEPS, "1": STEPS, "2": STEPS}
        assert "joining the federation at FedAvg round" in (logs / "client2.log").read_text()
        for name in ("server", "client0", "client1", "client2"):
            assert "1 thread(s)" in (logs / f"{name}.log").read_text(), name


def test_a_client_whose_server_is_not_reachable_fails_within_the_startup_timeout(tmp_path: Path) -> None:
    # Prepare: nothing listens on the port the client is told to find the server at
    config = write_config(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with DynamicFederation(config, ["server.startup_timeout_s=3"], num_clients=1, run_dir=tmp_path / "run") as federation:
        # Execute
        client = federation.start_client(0, server_port=port)
        code = federation.wait(client, timeout_s=90)

        # Assert: it gave up with an error naming the address and the setting, instead of hanging
        assert code != 0, federation.describe()
        log = client.output.read_text()
        assert f"the server is not reachable at 127.0.0.1:{port} within server.startup_timeout_s=3s" in log, federation.describe()
