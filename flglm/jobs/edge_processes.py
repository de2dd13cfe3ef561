"""Start a socket-link federation on this machine as child processes (tests, benchmarks, demo).

The server is one process on its own (no torchrun: it needs no rendezvous), its edge on a
free port it writes to ``run_dir/edge.json``; each client is a ``flglm client`` process that
reaches that address. Use as a context manager: on exit every process still running is killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from flglm.jobs.subprocesses import TRAIN_SCRIPT, FederationFailed, FederationProcess, ProcessGroup, _this_checkout_first
from flglm.run_layout import edge_address_path

_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


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

    def _start(self, name: str, cmd: list[str], prefix: Sequence[str] = ()) -> FederationProcess:
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        output = logs / f"{name}-{sum(p.name == name for p in self.processes)}.out"
        with output.open("w") as out:
            popen = subprocess.Popen([*prefix, *cmd], stdout=out, stderr=subprocess.STDOUT, env=self._env, start_new_session=True)
        process = FederationProcess(name, popen, output)
        self.processes.append(process)
        return process

    def start_server(self, overrides: Sequence[str] = (), *, timeout_s: float, prefix: Sequence[str] = ()) -> FederationProcess:
        """Start the server and wait (at most ``timeout_s``) until its edge's address is known.

        ``prefix`` goes before the command, e.g. ``ip netns exec HOST`` to run it on another network host
        (then give ``link.edge_host`` that host's address in ``overrides``)."""
        path = edge_address_path(self.run_dir)
        path.unlink(missing_ok=True)
        server = self._start("server", [sys.executable, str(TRAIN_SCRIPT), *self._args, *overrides], prefix)
        deadline = time.monotonic() + timeout_s
        while not path.is_file():
            if server.popen.poll() is not None or time.monotonic() > deadline:
                self.kill_all()
                raise FederationFailed(f"the server published no edge address ({path}).\n{self.describe()}")
            time.sleep(0.1)
        address = json.loads(path.read_text())
        self.address = (address["host"], int(address["port"]))
        return server

    def start_client(self, index: int, overrides: Sequence[str] = (), *, threads: int = 1, prefix: Sequence[str] = ()) -> FederationProcess:
        """Start client ``index`` (a ``flglm client`` process reaching the server's edge), after ``prefix`` as for the server."""
        if self.address is None:
            raise RuntimeError("start the server first")
        server = f"{self.address[0]}:{self.address[1]}"
        cmd = [sys.executable, "-m", "flglm.cli", "client", f"--client={index}", f"--server={server}", f"--threads={threads}"]
        return self._start(f"client{index}", [*cmd, *self._args, *overrides], prefix)
