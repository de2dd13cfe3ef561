"""What a stranger on the clients' network reaches: every TCP port of every federation host, scanned
from a network host of its own while a socket-link federation trains.

    python benchmarks/reachable.py            # needs root (network namespaces); about 2 minutes

Two deployments, each on Linux network namespaces joined by one switch (``flglm.network_hosts``),
with an *attacker* host beside the clients:

* ``single``: one server process on ``server0`` (``flglm train ... link.transport=socket``),
  client ``i`` on ``client{i}`` (``flglm client --server``);
* ``hierarchical``: two sub-servers on ``server0`` and ``server1``, each started on its own
  (``flglm train --sub-server I --cluster C0:29500``), the two hosts also on a network of their
  own (their store and gloo there, ``C0`` sub-server 0's address on it), client ``i`` on
  ``client{i}`` reaching sub-server ``i``'s edge on the clients' network.

While both clients train (1 server side, 2 encrypted clients with secure aggregation, the tiny GLM
of ``benchmarks/hostile.py``), the attacker host connects to every port 1-65535 of every host. Each
open port is probed: the server's edge (known from ``edge.json``); a torch TCPStore (a stranger's
``set`` accepted?); anything else. Then the federation must still finish (every process exit 0).

Last line: one JSON object; ``"reachable_non_edge"`` per deployment counts the open ports a stranger
found that are not an edge (goal 0 across organisations). The attacker scans every address of
every host it can route to: the clients' network (it has no interface on the sub-servers' own).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from hostile import write_config

from flglm.jobs import hostile as H
from flglm.jobs.edge_processes import EdgeFederation, ServerNode
from flglm.network_hosts import NetworkHosts, available

TIMEOUT_S = 240.0
MASTER_PORT = 29500


# ------------------------------------------------------------ the attacker's side (in its namespace)


def _open(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((address, port)) == 0


def scan(addresses: list[str]) -> dict[str, Any]:
    """Every open TCP port of each address (all hosts first, while the run lasts), then for each open
    port whether a stranger's store ``set`` took."""
    found: dict[str, Any] = {}
    with ThreadPoolExecutor(128) as pool:
        for address in addresses:
            started = time.monotonic()
            ports = [p for p, is_open in zip(range(1, 65536), pool.map(lambda p, a=address: _open(a, p), range(1, 65536))) if is_open]
            found[address] = {"open": ports, "seconds": round(time.monotonic() - started, 1)}
    for address, entry in found.items():
        entry["stores_writable"] = [p for p in entry["open"] if H.store_access(address, p)]
    return found


# ------------------------------------------------------------ the benchmark's side


def _attacker_scan(hosts: NetworkHosts, names: list[str], root: Path) -> dict[str, Any]:
    addresses = [hosts[n].address for n in names]
    cmd = hosts["attacker"].command([sys.executable, str(Path(__file__).resolve()), "--scan", ",".join(addresses)])
    with (root / "scan.log").open("w") as log:
        out = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=log, text=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"reachable: the scan failed (exit {out.returncode}); see {root / 'scan.log'}")
    by_address = json.loads(lines[-1])
    return {name: by_address[hosts[name].address] for name in names}


def _wait_training(federation: EdgeFederation, timeout_s: float) -> bool:
    """Until both clients have reached the server (a FedAvg round needs both), or a process ended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        logs = [p.output.read_text(errors="replace") for p in federation.processes if p.name.startswith("client")]
        if len(logs) == 2 and all("encrypted session established" in log for log in logs):
            return True
        if any(p.popen.poll() is not None for p in federation.processes):
            return False
        time.sleep(0.2)
    return False


def deployment(kind: str, root: Path, config: Path) -> dict[str, Any]:
    names = ["server0", "server1", "client0", "client1", "attacker"] if kind == "hierarchical" else ["server0", "client0", "client1", "attacker"]
    servers = [n for n in names if n.startswith("server")]
    common = ["server.num_threads=1", *(["server.parallelism=hierarchical", "server.sub_servers=2"] if kind == "hierarchical" else [])]
    run_dir = root / kind
    with (
        NetworkHosts(names, cluster=servers if kind == "hierarchical" else ()) as hosts,
        EdgeFederation(config, common, num_clients=2, run_dir=run_dir) as federation,
    ):
        if kind == "hierarchical":
            nodes = [ServerNode(hosts[n].address, hosts[n].command([]), cluster_address=hosts[n].cluster_address) for n in servers]
            federation.start_sub_servers(nodes, master_port=MASTER_PORT, timeout_s=TIMEOUT_S)
        else:
            federation.start_server([f"link.edge_host={hosts['server0'].address}"], timeout_s=TIMEOUT_S, prefix=hosts["server0"].command([]))
        edges = {(str(a[0]), int(a[1])) for a in federation.addresses}
        address_of = {n: hosts[n].address for n in names}
        for client in (0, 1):
            federation.start_client(client, prefix=hosts[f"client{client}"].command([]))
        training = _wait_training(federation, 120)
        scanned = _attacker_scan(hosts, [n for n in names if n != "attacker"], root) if training else {}
        running_after_scan = training and all(p.popen.poll() is None for p in federation.processes)  # the probes too
        try:
            federation.wait_all(deadline=time.monotonic() + TIMEOUT_S)
            finished = True
        except Exception as err:  # noqa: BLE001 - reported: the honest run did not finish
            finished, error = False, str(err)[-1500:]
        exit_codes = {p.name: p.popen.returncode for p in federation.processes}
    ports: dict[str, list[dict[str, Any]]] = {}
    for name, found in scanned.items():
        ports[name] = [
            {
                "port": port,
                "what": "edge"
                if (address_of[name], port) in edges
                else "store (a stranger's write taken)"
                if port in found["stores_writable"]
                else "other",
            }
            for port in found["open"]
        ]
    non_edge = sum(1 for entries in ports.values() for e in entries if e["what"] != "edge")
    result = {
        "hosts": names,
        "training_when_scanned": training,
        "running_after_scan_and_probes": running_after_scan,
        "open_ports": ports,
        "reachable_non_edge": non_edge,
        "honest_finished": finished,
        "exit_codes": exit_codes,
        "scan_seconds": {n: f["seconds"] for n, f in scanned.items()},
    }
    if not finished:
        result["error"] = error
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="reachable", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scan", help=argparse.SUPPRESS)  # the attacker's side, run inside its namespace
    parser.add_argument("--steps", type=int, default=2500, help="optimizer steps per client (the scan must fit in the run)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories here")
    args = parser.parse_args(argv)
    if args.scan:
        print(json.dumps(scan(args.scan.split(","))))
        return
    ok, why = available()
    if not ok:
        raise SystemExit(f"reachable: needs network namespaces: {why}")
    started = time.monotonic()
    with TemporaryDirectory(prefix="flglm-reachable-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        config, _ = write_config(root, args.steps)
        results = {kind: deployment(kind, root, config) for kind in ("single", "hierarchical")}
    print(f"\n{'deployment':<13} {'host':<9} open ports (from the attacker's host)")
    for kind, result in results.items():
        for host, entries in result["open_ports"].items():
            listed = ", ".join(f"{e['port']} ({e['what']})" for e in entries) or "none"
            print(f"{kind:<13} {host:<9} {listed}")
        print(
            f"{kind:<13} honest clients finished: {result['honest_finished']}; training when the scan began: "
            f"{result['training_when_scanned']}; still running after the scan and probes: {result['running_after_scan_and_probes']}"
        )
    summary = {
        "benchmark": "reachable",
        "reachable_non_edge": {k: r["reachable_non_edge"] for k, r in results.items()},
        "honest_finished": {k: r["honest_finished"] for k, r in results.items()},
        "deployments": results,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
