"""The whole attack set (``benchmarks/hostile.py``) against the socket link, as a test: a hostile
participant (client 1's valid keys) and a stranger (none) try code, files, remote objects, the
server side's stores and ports, off-table calls, junk frames and 200 connections while two honest
clients train; every attempt is refused, the honest clients finish, and the run trains the same
state, bit for bit, as the same federation unattacked. On loopback, and across network hosts (the
attacker on a host of its own, the hierarchical server's store and collectives on a network of
the sub-servers' own; there the unattacked reference is the torch-RPC federation on one host). Real processes and sockets; the benchmark's own hard timeouts, and this one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flglm.jobs.subprocesses import REPO_ROOT
from flglm.network_hosts import available

AVAILABLE, WHY = available()
pytestmark = pytest.mark.multiprocess
STEPS = {"socket": 240, "hierarchical-hosts": 320}
"""Steps per client: the attacks take ~4-6 s and the clients train ~7-8 s more (measured: socket 4.3 s
and 9.6 s more at 300 steps, hierarchical 5.4 s and 11.5 s more at 400); the benchmark fails if they end first."""


@pytest.mark.parametrize(
    "mode", ["socket", pytest.param("hierarchical-hosts", marks=pytest.mark.skipif(not AVAILABLE, reason=f"no network namespaces here: {WHY}"))]
)
def test_every_attack_on_the_socket_link_is_refused_and_changes_nothing(tmp_path: Path, mode: str) -> None:
    # Execute: enough steps per client that the attacks land while the clients train (the benchmark
    # exits 1 if one landed after the run, an honest client failed, or the trained state differs)
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "hostile.py"), "--modes", mode, "--steps", str(STEPS[mode]), "--keep", str(tmp_path)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=280, cwd=REPO_ROOT)
    logs = "\n".join(f"--- {f}\n{f.read_text(errors='replace')[-3000:]}" for f in sorted(tmp_path.rglob("*.log")) + sorted(tmp_path.rglob("*.out")))
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}\n{logs[-12000:]}"

    # Assert: nothing got through; each kind of junk and the flood was seen and counted by the edge
    result = json.loads(done.stdout.splitlines()[-1])
    refused = {attack: outcome for attack, outcome in result["outcomes"][mode].items() if outcome != "refused"}
    assert result["succeeded"] == 0 and not refused, refused
    assert result["honest_clients_finished"][mode] and result["state_unchanged"][mode] and result["attacks_while_training"][mode]
    edge = result["edge"][mode]
    assert edge["handshakes_refused"] >= 1 and edge["malformed_frames"] >= 20
    assert edge["evicted"] + edge["timeouts"] >= 136  # 200 idle connections into 64 places
    if mode == "hierarchical-hosts":  # the store (29500) and gloo listen on the sub-servers' own network only
        clients_network = {address for address, _ in result["edges"][mode]}
        internal = [entry.split(": ")[1] for entry in result["server_listening"][mode]]
        internal = [a for a in internal if tuple(a.rsplit(":", 1)) not in {(h, str(p)) for h, p in result["edges"][mode]}]
        assert any(a.endswith(":29500") for a in internal) and not any(a.rsplit(":", 1)[0] in clients_network for a in internal), internal
