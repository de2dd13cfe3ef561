"""Start a socket-link federation on this machine as child processes (tests, benchmarks, demo).

The server is one process on its own (no torchrun: it needs no rendezvous), its edge on a
free port it writes to ``run_dir/edge.json``; or, hierarchical, ``S`` sub-servers, each a
process on its own (``flglm train --sub-server I --cluster HOST:PORT``: sub-server 0 hosts
their store on its cluster address alone; clients never reach it), sub-server ``i``'s edge
address in ``run_dir/edge-i.json``. Each client is a
``flglm client`` process that reaches its server's address (client ``i``: sub-server
``i % S``). Use as a context manager: on exit every process still running is killed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flglm.jobs.edge_link import published_address
from flglm.jobs.subprocesses import (
    TRAIN_SCRIPT,
    FederationFailed,
    FederationProcess,
    ProcessGroup,
    _this_checkout_first,
    sub_server_overrides,
)
from flglm.run_layout import edge_address_path, generation_edge_path

_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class ServerNode:
    """Where one sub-server runs: its edge's address, its address on the sub-servers' own network
    (node 0's hosts their store; default: the edge's), the command prefix that puts it there
    (e.g. ``ip netns exec HOST``) and extra environment."""

    address: str
    prefix: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cluster_address: str | None = None

    @property
    def cluster(self) -> str:
        return self.cluster_address or self.address


class EdgeFederation(ProcessGroup):
    """The processes of one socket-link federation (``link.transport=socket``)."""

    def __init__(self, config: str | Path, overrides: Sequence[str] = (), *, num_clients: int, run_dir: str | Path) -> None:
        super().__init__(run_dir)
        self.num_clients = num_clients
        self._args = [
            "--config",
            str(config),
            f"run_dir={self.run_dir}",
            f"federation.num_clients={num_clients}",
            "link.transport=socket",
            *overrides,
        ]
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_") and k not in _DIST_VARS}
        self._env.setdefault("PYTHONUNBUFFERED", "1")
        self._env["PYTHONPATH"] = _this_checkout_first(self._env.get("PYTHONPATH"))
        self.address: tuple[str, int] | None = None
        self.addresses: list[tuple[str, int]] = []
        """Each server process's edge (one, or one per sub-server): client ``i`` reaches ``addresses[i % len]``."""

    def _start(self, name: str, cmd: list[str], prefix: Sequence[str] = (), env: Mapping[str, str] | None = None) -> FederationProcess:
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        output = logs / f"{name}-{sum(p.name == name for p in self.processes)}.out"
        with output.open("w") as out:
            popen = subprocess.Popen([*prefix, *cmd], stdout=out, stderr=subprocess.STDOUT, env={**self._env, **(env or {})}, start_new_session=True)
        process = FederationProcess(name, popen, output)
        self.processes.append(process)
        return process

    def start_server(self, overrides: Sequence[str] = (), *, timeout_s: float, prefix: Sequence[str] = ()) -> FederationProcess:
        """Start the server and wait (at most ``timeout_s``) until its edge's address is known.

        ``prefix`` goes before the command, e.g. ``ip netns exec HOST`` to run it on another network host
        (then give ``link.edge_host`` that host's address in ``overrides``)."""
        edge_address_path(self.run_dir).unlink(missing_ok=True)
        server = self._start("server", [sys.executable, str(TRAIN_SCRIPT), *self._args, *overrides], prefix)
        self._wait_for_edges([server], time.monotonic() + timeout_s)
        return server

    def start_sub_servers(
        self, nodes: Sequence[ServerNode], overrides: Sequence[str] = (), *, master_port: int, timeout_s: float
    ) -> list[FederationProcess]:
        """A hierarchical server (the config's ``server.sub_servers`` must be ``len(nodes)``: the clients
        check that they share it) of sub-servers, one process per node started on its own
        (``--sub-server I --cluster A0:master_port``, A0 node 0's cluster address), each edge on its
        node's address; waits (at most ``timeout_s``) until every edge's address is known."""
        count = len(nodes)
        for index in range(count):
            edge_address_path(self.run_dir, index).unlink(missing_ok=True)
        processes = []
        cluster = f"{nodes[0].cluster}:{master_port}"
        for rank, node in enumerate(nodes):
            args = [f"--sub-server={rank}", f"--cluster={cluster}", *self._args, f"link.edge_host={node.address}", *overrides]
            processes.append(self._start(f"server{rank}", [sys.executable, str(TRAIN_SCRIPT), *args], node.prefix, node.env))
        self._wait_for_edges(processes, time.monotonic() + timeout_s)
        return processes

    def _wait_for_edges(self, servers: Sequence[FederationProcess], deadline: float, paths: Sequence[Path] | None = None) -> None:
        """Wait for each server's published edge address (``paths``; default ``edge[-i].json``)."""

        def alive() -> bool:
            return all(s.popen.poll() is None for s in servers)

        addresses = []
        for index, path in enumerate(paths or [edge_address_path(self.run_dir, i) for i in range(len(servers))]):
            try:
                addresses.append(published_address(path, timeout_s=max(0.0, deadline - time.monotonic()), alive=alive))
            except TimeoutError:
                self.kill_all()
                raise FederationFailed(f"server {index} published no edge address ({path}).\n{self.describe()}") from None
        self.addresses = addresses
        self.address = addresses[0]

    def start_client(self, index: int, overrides: Sequence[str] = (), *, threads: int = 1, prefix: Sequence[str] = ()) -> FederationProcess:
        """Start client ``index`` (a ``flglm client`` process reaching the server's edge), after ``prefix`` as for the server."""
        if not self.addresses:
            raise RuntimeError("start the server first")
        host, port = self.addresses[index % len(self.addresses)]
        server = f"{host}:{port}"
        cmd = [sys.executable, "-m", "flglm.cli", "client", f"--client={index}", f"--server={server}", f"--threads={threads}"]
        return self._start(f"client{index}", [*cmd, *self._args, *overrides], prefix)

    def start_generation_server(
        self, args: Sequence[str] = (), overrides: Sequence[str] = (), *, timeout_s: float, prefix: Sequence[str] = ()
    ) -> FederationProcess:
        """``flglm generate --serve`` with ``args`` (``--base``, ``--weights``, ...), the server side of
        generation on its own; waits (at most ``timeout_s``) until its edge's address
        (``run_dir/generate/edge.json``) is known."""
        path = generation_edge_path(self.run_dir)
        path.unlink(missing_ok=True)
        server = self._start("generate-server", [sys.executable, "-m", "flglm.cli", "generate", "--serve", *args, *self._args, *overrides], prefix)
        self._wait_for_edges([server], time.monotonic() + timeout_s, [path])
        return server

    def start_generation_client(
        self, index: int, args: Sequence[str], overrides: Sequence[str] = (), *, prefix: Sequence[str] = ()
    ) -> FederationProcess:
        """``flglm generate --client index --server ADDRESS`` with ``args`` (``--prompts-file``, ``--out``, ...)."""
        if self.address is None:
            raise RuntimeError("start the generation server first")
        server = f"{self.address[0]}:{self.address[1]}"
        cmd = [sys.executable, "-m", "flglm.cli", "generate", f"--client={index}", f"--server={server}", *args]
        return self._start(f"generate-client{index}", [*cmd, *self._args, *overrides], prefix)


def run_edge_federation(
    config: str | Path,
    overrides: Sequence[str] = (),
    *,
    num_clients: int,
    run_dir: str | Path,
    timeout_s: float,
    sub_servers: int = 1,
) -> None:
    """A whole socket-link federation on this machine: the server (or ``sub_servers`` sub-servers,
    each on its own, their store on a free loopback port), then every client, each a process of its
    own (one thread each); waits for all and raises FederationFailed, with every log, if one fails
    or the whole takes over ``timeout_s``. ``run_federation``'s counterpart."""
    deadline = time.monotonic() + timeout_s
    common = ["server.num_threads=1", *sub_server_overrides(sub_servers, overrides)]
    with EdgeFederation(config, common, num_clients=num_clients, run_dir=run_dir) as federation:
        if sub_servers > 1:
            nodes = [ServerNode("127.0.0.1")] * sub_servers
            federation.start_sub_servers(nodes, master_port=free_local_port(), timeout_s=timeout_s)
        else:
            federation.start_server(timeout_s=timeout_s)
        for index in range(num_clients):
            federation.start_client(index)
        federation.wait_all(deadline=deadline)


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 now (a store's port for processes started on this machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
