"""Hostile participants and strangers against each deployment mode: which attacks get through.

    python benchmarks/hostile.py                          # every mode (about 4 minutes on 2 cores; the -hosts ones need root)
    python benchmarks/hostile.py --modes socket,rpc       # some

Each mode runs a real federation (1 server side, 2 encrypted clients with secure aggregation, a
tiny GLM, each client with its own training file) and attacks it while it trains:

* ``rpc`` (``link.transport=rpc``, torchrun; the one-trust-domain mode, every process
  unpickling RPC payloads through ``flglm/link/rpc_allowlist.py``): client 1 is a *hostile
  participant*: a real client process (``benchmarks/hostile_workers.py``) that trains honestly
  and, from a side thread, makes its own RPC calls to the server and to client 0 with the RPC
  agent torchrun's world gives it. A *stranger* (no key, no rank) port-scans the federation's
  processes, writes to any store it finds, tries to join the RPC group through it, and sends
  pickles, junk and 200 connections to the server's ports. On loopback.
* ``socket``, ``socket-hosts``, ``hierarchical-hosts`` (``link.transport=socket``: the server's
  edges, ``flglm client --server HOST:PORT``): the hostile participant is a process holding
  client 1's valid keys (before the real client 1 starts: it would otherwise replace its own
  session), the stranger one without keys; both try the same things through every port the
  server side listens on, at each of its addresses, and the clients' (they listen on none).
  ``socket``: all on loopback beside the server (an upper bound on what another host reaches).
  ``socket-hosts``: the server, each client and the attacker each on a network host of its own
  (Linux namespaces, ``flglm.network_hosts``). ``hierarchical-hosts``: two sub-servers started
  on their own (``--sub-server/--cluster``), on the clients' network and on one of their own
  (their store and gloo there), each client and the attacker on a host of its own.
  ``generate-hosts``: generation (``flglm generate --serve`` with the base model, client 0
  ``--server HOST:PORT`` greedily decoding 300 prompts one by one), server, client and attacker
  each on a host of its own; the participant holds client 1's keys (listed, not generating).
  In these the server side serves deterministically (client batching; one client per
  sub-server; greedy decoding), and the same job run again unattacked must train the same
  state (generate the same tokens) bit for bit; for ``hierarchical-hosts`` that reference is
  the torch-RPC federation on one host (so it also shows the link and the hosts change nothing).

An attack *succeeded* when its effect is observed: the marker file a pickle's command would
touch exists; bytes of the server's private key or of client 0's training file came back; a
function or a remote object ran (a value came back); a non-edge port of the server side
connected, or a store took a write; a frame outside the three entries got anything but a
refusal; or (junk, floods) a target stopped or an honest client did not finish.

Last line: one JSON object; ``succeeded`` counts the socket modes' successful attacks (goal 0).
Exit 1 if an attack landed after the run ended (raise ``--steps``), or in a socket mode an honest
client failed or the attacked run's trained state differs from the unattacked one's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import psutil
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flglm.crypto.keyring import generate_key_set
from flglm.crypto.keys import generate_identity
from flglm.data import write_demo_dataset
from flglm.jobs import hostile as H
from flglm.jobs.edge_processes import EdgeFederation, ServerNode
from flglm.jobs.subprocesses import FederationFailed, FederationProcess, run_federation, run_torchrun
from flglm.network_hosts import Host, NetworkHosts, available
from flglm.run_layout import client_weights_path, generation_summary_path, middle_weights_path
from flglm.tensor_files import load_tensors

WORKERS = REPO / "benchmarks" / "hostile_workers.py"
MODEL = {
    "model_type": "glm", "vocab_size": 272, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
FLOOD = 200
TIMEOUT_S = 150.0
MASTER_PORT = 29500  # the sub-servers' store, on their own network
GENERATED_PROMPTS, GENERATED_TOKENS = 300, 24  # the generation modes: prompts decoded one by one, tokens each

# (row, attacker): the rows of the table, in order
ROWS: list[tuple[str, str]] = [
    ("eval on the server", "participant"), ("eval on the server", "stranger"),
    ("eval on the peer client", "participant"), ("eval on the peer client", "stranger"),
    ("pickle runs a command on the server", "participant"), ("pickle runs a command on the server", "stranger"),
    ("pickle runs a command on the peer client", "participant"), ("pickle runs a command on the peer client", "stranger"),
    ("torch.from_file: server's private key", "participant"), ("torch.from_file: server's private key", "stranger"),
    ("torch.from_file: peer's training file", "participant"), ("torch.from_file: peer's training file", "stranger"),
    ("rpc.remote object on the server", "participant"), ("rpc.remote object on the server", "stranger"),
    ("rpc.remote object on the peer client", "participant"), ("rpc.remote object on the peer client", "stranger"),
    ("join a rendezvous store / RPC group", "participant"), ("join a rendezvous store / RPC group", "stranger"),
    ("call a non-public function / method code", "participant"), ("call a non-public function / method code", "stranger"),
    ("handshake with an unlisted key", "stranger"),
    ("oversize, truncated, random frames", "stranger"),
    (f"{FLOOD} connections at once", "stranger"),
]  # fmt: skip


def write_config(root: Path, steps: int) -> tuple[Path, dict[str, Path]]:
    """Two clients, each with its own training file (``data.partition=none``), the byte tokenizer
    (no process reads another's file to build a vocabulary), encryption and secure aggregation."""
    files = {}
    for client in (0, 1):
        files[f"train{client}"], dev = write_demo_dataset(root / f"data{client}", train_rows=steps * 8, dev_rows=16, seed=client + 1)
    generate_key_set(root / "keys", num_clients=2)
    cfg = {
        "seed": 0,
        "model": {"config": MODEL},
        "optim": {"name": "adamw", "lr": 0.003, "scheduler": "constant", "warmup_steps": 0},
        "data": {
            "train_path": str(root / "data{client}" / "train.tsv"),
            "dev_path": str(dev),
            "partition": "none",
            "tokenizer": "bytes",
            "max_length": 32,
            "batch_size": 8,
            "eval_batch_size": 16,
        },
        "task": {"kind": "language_modeling"},
        "federation": {"num_clients": 2, "aggregate_every": 5},
        "crypto": {"enabled": True, "secure_aggregation": True, "key_dir": str(root / "keys")},
        "server": {"num_threads": 1, "startup_timeout_s": 120},
        "trainer": {"max_epochs": 1, "max_steps": steps, "enable_progress_bar": False, "limit_val_batches": 0, "num_sanity_val_steps": 0},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, {"server_key": root / "keys" / "server.key", **files}


# ---------------------------------------------------------------- checks


class Secrets:
    """What must never come back: the server's private key, client 0's training file."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.key = files["server_key"].read_bytes()
        self.train = files["train0"].read_bytes()[:64]

    def leaked(self, data: bytes) -> bool:
        """Any 8 consecutive bytes of either secret in ``data``."""
        return any(secret[i : i + 8] in data for secret in (self.key, self.train) for i in range(len(secret) - 7))


def _returned(outcome: dict[str, Any] | None) -> bool:
    return outcome is not None and "error" not in outcome


def _hex_leak(outcome: dict[str, Any] | None, secrets: Secrets) -> bool:
    return _returned(outcome) and secrets.leaked(bytes.fromhex(outcome.get("hex", ""))) if outcome else False


def _send_many(address: tuple[str, int], payloads: list[bytes]) -> list[bytes]:
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda data: H.send_raw(address, data), payloads))


def _wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------- rpc mode


def training(run_dir: Path) -> bool:
    """Whether every client of ``run_dir``'s federation has joined (its training is under way)."""
    log = run_dir / "logs" / "server.log"
    return log.is_file() and "joined (2/2)" in log.read_text(errors="replace")


class RpcRun:
    """One torchrun federation of ``hostile_workers.py`` (1 server, 2 clients) run in a thread."""

    def __init__(self, root: Path, name: str, config: Path, env: dict[str, str]) -> None:
        self.run_dir = root / name
        self.result: dict[str, Any] = {}
        args = ["--config", str(config), f"run_dir={self.run_dir}"]
        env = {"OMP_NUM_THREADS": "1", "HOSTILE_RANK": "-1", **env}
        self.thread = threading.Thread(target=self._run, args=(args, env), daemon=True)
        self.thread.start()

    def _run(self, args: list[str], env: dict[str, str]) -> None:
        try:
            run_torchrun(WORKERS, args, nproc=3, timeout_s=TIMEOUT_S, run_dir=self.run_dir, extra_env=env)
            self.result["ok"] = True
        except FederationFailed as err:
            self.result.update(ok=False, error=str(err)[-2000:])

    def ports(self) -> dict[str, list[int]]:
        """What a port scan of this machine finds, per process: torchrun's agent, then each rank."""
        for proc in psutil.Process().children(recursive=True):
            try:
                if "torch.distributed.run" not in proc.cmdline() or f"run_dir={self.run_dir}" not in proc.cmdline():
                    continue
                ranks = {c.environ()["RANK"]: c.pid for c in proc.children(recursive=True) if "RANK" in c.environ()}
            except psutil.NoSuchProcess:
                continue
            return {"agent": sorted(H.listening_ports(proc.pid) - {p for pid in ranks.values() for p in H.listening_ports(pid)}),
                    **{f"rank{r}": sorted(H.listening_ports(pid)) for r, pid in sorted(ranks.items())}}  # fmt: skip
        return {}

    def wait_training(self) -> dict[str, list[int]]:
        """Wait until both clients joined; the ports then (empty if the run ended first)."""
        _wait_for(lambda: training(self.run_dir) or not self.thread.is_alive(), 90)
        return self.ports() if self.thread.is_alive() else {}

    def finish(self) -> tuple[bool, dict[str, Any]]:
        self.thread.join(timeout=TIMEOUT_S + 30)
        honest = bool(self.result.get("ok"))
        return honest, {"honest_clients_finished": honest, **({} if honest else {"error": self.result.get("error", "did not end")})}


def _stranger_join(root: Path, spec: dict[str, Any], store: int) -> dict[str, Any]:
    """The keyless process: join the RPC group through ``store``, then the RPC attacks (25 s at most)."""
    path, out = root / "stranger.json", root / "stranger-out.json"
    path.write_text(json.dumps({**spec, "store": ["127.0.0.1", store], "out": str(out)}))
    cmd = [sys.executable, str(WORKERS), "stranger", str(path)]
    with (root / "stranger.log").open("w") as log:
        try:
            subprocess.run(cmd, check=False, timeout=25, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        except subprocess.TimeoutExpired:
            pass
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("join", {"error": "init_rpc did not return within 25 s (killed)"})
    return results


def rpc_mode(root: Path, config: Path, files: dict[str, Path], secrets: Secrets) -> tuple[dict[tuple[str, str], bool], bool, dict[str, Any]]:
    """Three federations: (1) the hostile participant, and a stranger that writes to the stores
    torchrun's agent listens on and joins through one; (2) a stranger's pickles and junk at the
    server's RPC port; (3) its flood of connections there. Apart, so each disruption is its own."""
    markers = {f"{who}-{target}": root / f"pwned-rpc-{who}-{target}" for who in ("participant", "stranger") for target in ("server", "client0")}
    base = {"server_key": str(files["server_key"]), "peer_train": str(files["train0"]), "server_key_dir": str(files["server_key"].parent)}
    observed: dict[str, Any] = {}

    # (1) the participant (client 1, a real client of this federation) and the stranger's store and join
    spec = {**base, "markers": {t: str(markers[f"participant-{t}"]) for t in ("server", "client0")}, "out": str(root / "participant-out.json")}
    spec["server_log"] = str(root / "rpc" / "logs" / "server.log")
    (root / "participant.json").write_text(json.dumps(spec))
    run = RpcRun(root, "rpc", config, {"HOSTILE_RANK": "2", "HOSTILE_SPEC": str(root / "participant.json")})
    ports = run.wait_training()
    stores = [port for port in ports.get("agent", []) if H.store_access("127.0.0.1", port)]
    stranger_spec = {**base, "markers": {t: str(markers[f"stranger-{t}"]) for t in ("server", "client0")}}
    joined = _stranger_join(root, stranger_spec, stores[0]) if stores else {"join": {"error": "no store found"}}
    observed["run1_attacks_while_training"] = run.thread.is_alive()
    honest1, observed["run1"] = run.finish()
    participant = json.loads((root / "participant-out.json").read_text()) if (root / "participant-out.json").is_file() else {}
    observed["run1"].update(listening_ports=ports, stores_writable=stores, participant=participant, stranger=joined)

    # (2) pickles and junk at the server's RPC port
    run = RpcRun(root, "rpc-junk", config, {})
    ports = run.wait_training()
    replies: list[bytes] = []
    rng = random.Random(0)
    for port in ports.get("rank0", []):
        address = ("127.0.0.1", port)
        replies += _send_many(
            address, [*H.pickle_frames(H.Exploit(markers["stranger-server"])), *H.pickle_frames(H.FromFile(files["server_key"], 32))]
        )
        replies += _send_many(address, [data for family in H.junk_frames(rng).values() for data in family])
    observed["run2_attacks_while_training"] = run.thread.is_alive()
    honest2, observed["run2"] = run.finish()
    observed["run2"].update(listening_ports=ports, replies_with_bytes=sum(bool(r) for r in replies))

    # (3) 200 connections at once to the server's RPC port, held while the clients train
    run = RpcRun(root, "rpc-flood", config, {})
    ports = run.wait_training()
    held = 0
    if ports.get("rank0"):
        with H.connections(("127.0.0.1", ports["rank0"][0]), FLOOD) as socks:
            held = len(socks)
            observed["run3_attacks_while_training"] = run.thread.is_alive()
            run.thread.join(timeout=TIMEOUT_S)
    honest3, observed["run3"] = run.finish()
    observed["run3"].update(listening_ports=ports, flood_held=held)

    p, s = participant.get, joined.get
    store_or_join = bool(stores) or _returned(s("join"))
    outcome = {
        ("eval on the server", "participant"): _hex_leak(p("eval:server"), secrets),
        ("eval on the server", "stranger"): _hex_leak(s("eval:server"), secrets),
        ("eval on the peer client", "participant"): _hex_leak(p("eval:client0"), secrets),
        ("eval on the peer client", "stranger"): _hex_leak(s("eval:client0"), secrets),
        ("pickle runs a command on the server", "participant"): markers["participant-server"].exists(),
        ("pickle runs a command on the server", "stranger"): markers["stranger-server"].exists(),
        ("pickle runs a command on the peer client", "participant"): markers["participant-client0"].exists(),
        ("pickle runs a command on the peer client", "stranger"): markers["stranger-client0"].exists(),
        ("torch.from_file: server's private key", "participant"): _hex_leak(p("from_file:server"), secrets),
        ("torch.from_file: server's private key", "stranger"): _hex_leak(s("from_file:server"), secrets) or any(secrets.leaked(r) for r in replies),
        ("torch.from_file: peer's training file", "participant"): _hex_leak(p("from_file:client0"), secrets),
        ("torch.from_file: peer's training file", "stranger"): _hex_leak(s("from_file:client0"), secrets),
        ("rpc.remote object on the server", "participant"): _returned(p("remote:server")),
        ("rpc.remote object on the server", "stranger"): _returned(s("remote:server")),
        ("rpc.remote object on the peer client", "participant"): _returned(p("remote:client0")),
        ("rpc.remote object on the peer client", "stranger"): _returned(s("remote:client0")),
        ("join a rendezvous store / RPC group", "participant"): _returned(p("rendezvous")) and p("rendezvous", {}).get("repr") == "True",
        ("join a rendezvous store / RPC group", "stranger"): store_or_join,
        ("call a non-public function / method code", "participant"): _returned(p("nonpublic:server")),
        ("call a non-public function / method code", "stranger"): _returned(s("nonpublic:server")),
        ("handshake with an unlisted key", "stranger"): store_or_join,  # no handshake guards torch RPC or its stores
        ("oversize, truncated, random frames", "stranger"): not honest2,
        (f"{FLOOD} connections at once", "stranger"): not honest3,
    }
    return outcome, honest1 and honest2 and honest3, observed


# ---------------------------------------------------------------- socket modes


@dataclass(frozen=True)
class Placement:
    """Where a socket-link federation runs: every process on this machine beside the attacker
    (``hosts`` None: loopback, an upper bound on what another host reaches), or each on a network
    host of its own (``server0`` [``server1``: the sub-servers, on a network of their own too],
    ``client0``, ``client1``) with the attacker, this process, on yet another."""

    hosts: dict[str, Host] | None = None
    sub_servers: int = 1
    generation: bool = False
    """``flglm generate --serve`` and one generating client (client 0) instead of training."""


def _clients_training(federation: EdgeFederation, count: int) -> bool:
    """Whether ``count`` clients have their encrypted sessions (training, or generation, is under way)."""
    logs = [p.output.read_text(errors="replace") for p in federation.processes if "client" in p.name]
    return len(logs) == count and all("encrypted session established" in log or "generated 1 of" in log for log in logs)


def _server_addresses(hosts: dict[str, Host] | None, name: str) -> list[str]:
    """Every address of server host ``name`` (its network's and its cluster's), or loopback."""
    if hosts is None:
        return ["127.0.0.1"]
    return [a for a in (hosts[name].address, hosts[name].cluster_address) if a]


def _start_client(fed: EdgeFederation, index: int, placement: Placement, root: Path) -> FederationProcess:
    prefix = placement.hosts[f"client{index}"].command([]) if placement.hosts else ()
    if placement.generation:
        return fed.start_generation_client(index, ["--base", f"--prompts-file={_prompts(root)}"], prefix=prefix)
    return fed.start_client(index, prefix=prefix)


def _prompts(root: Path) -> Path:
    path = root / "prompts.txt"
    if not path.is_file():
        path.write_text("".join(f"prompt {i}: the quick brown fox\n" for i in range(GENERATED_PROMPTS)))
    return path


def _start_servers(fed: EdgeFederation, placement: Placement) -> list[FederationProcess]:
    hosts = placement.hosts
    if placement.generation:
        prefix = hosts["server0"].command([]) if hosts else ()
        edge = [f"link.edge_host={hosts['server0'].address}"] if hosts else []
        return [fed.start_generation_server(["--base"], edge, timeout_s=TIMEOUT_S, prefix=prefix)]
    if placement.sub_servers > 1:
        assert hosts is not None, "sub-servers run on hosts of their own"
        names = [f"server{i}" for i in range(placement.sub_servers)]
        nodes = [ServerNode(hosts[n].address, hosts[n].command([]), cluster_address=hosts[n].cluster_address) for n in names]
        return fed.start_sub_servers(nodes, master_port=MASTER_PORT, timeout_s=TIMEOUT_S)
    if hosts is None:
        return [fed.start_server(timeout_s=TIMEOUT_S)]
    return [fed.start_server([f"link.edge_host={hosts['server0'].address}"], timeout_s=TIMEOUT_S, prefix=hosts["server0"].command([]))]


def _socket_overrides(placement: Placement) -> list[str]:
    """Deterministic serving, so that an unattacked run is the attacked one's reference bit for
    bit: one client per sub-server, or both clients' steps as one group (``client_batching``)."""
    overrides = ["link.max_connections=64", "link.first_frame_timeout_s=3"]
    if placement.generation:  # greedy decoding of many prompts, one at a time: long enough to attack, and deterministic
        return [*overrides, f"generation.max_new_tokens={GENERATED_TOKENS}", "generation.batch_size=1"]
    if placement.sub_servers > 1:
        return [*overrides, "server.parallelism=hierarchical", f"server.sub_servers={placement.sub_servers}"]
    return [*overrides, "server.parallelism=client_batching", "server.batch_window_ms=5000"]


def _trained_state(run_dir: Path, placement: Placement) -> dict[str, torch.Tensor]:
    """What the run trained: the server's middle stack and each client's blocks (generation: the generated token ids)."""
    if placement.generation:
        rows = json.loads((run_dir / "generate" / "generations.json").read_text())
        return {f"generated/{i}": torch.tensor(row["token_ids"]) for i, row in enumerate(rows)}
    state = {f"server/{k}": v for k, v in load_tensors(middle_weights_path(run_dir)).items()}
    for client in (0, 1):
        state |= {f"client{client}/{k}": v for k, v in load_tensors(client_weights_path(run_dir, client)).items()}
    return state


def unattacked_state(root: Path, config: Path, placement: Placement) -> dict[str, torch.Tensor]:
    """The same job with nobody attacking it: the reference. Placed alike; for sub-servers, the
    torch-RPC federation on one host instead (torchrun, loopback: one client per sub-server is
    deterministic on either link), so the comparison also shows that neither the socket link
    nor the separate hosts changed a bit."""
    run_dir = root / "unattacked"
    if placement.sub_servers > 1:
        overrides = [o for o in _socket_overrides(placement) if not o.startswith(("link.", "server.sub_servers="))]
        run_federation(config, overrides, num_clients=2, sub_servers=placement.sub_servers, run_dir=run_dir, timeout_s=TIMEOUT_S)
        return _trained_state(run_dir, placement)
    with EdgeFederation(config, _socket_overrides(placement), num_clients=2, run_dir=run_dir) as fed:
        _start_servers(fed, placement)
        for client in (0,) if placement.generation else (0, 1):
            _start_client(fed, client, placement, root)
        fed.wait_all(deadline=time.monotonic() + TIMEOUT_S)
    return _trained_state(run_dir, placement)


def socket_mode(
    root: Path, config: Path, files: dict[str, Path], secrets: Secrets, placement: Placement = Placement()
) -> tuple[dict[tuple[str, str], bool], bool, dict[str, Any]]:
    run_dir = root / "socket"
    hosts = placement.hosts
    markers = {who: root / f"pwned-socket-{who}" for who in ("participant", "stranger")}
    overrides = _socket_overrides(placement)
    observed: dict[str, Any] = {"placement": "loopback" if hosts is None else f"{len(hosts)} network hosts + the attacker's"}
    deadline = time.monotonic() + TIMEOUT_S
    with EdgeFederation(config, overrides, num_clients=2, run_dir=run_dir) as fed:
        servers = _start_servers(fed, placement)
        edges = [(str(a), int(p)) for a, p in fed.addresses]
        own_edge = edges[1 % len(edges)]  # client 1's sub-server: where the participant's keys are listed
        client0 = _start_client(fed, 0, placement, root)
        # Every port the server side listens on, at every address the attacker might try
        listening = {s.name: sorted(H.listening_sockets(s.popen.pid)) for s in servers}
        addresses = {s.name: _server_addresses(hosts, f"server{i}") for i, s in enumerate(servers)}
        observed.update(server_listening=[f"{n}: {a}:{p}" for n, bound in listening.items() for a, p in bound], edges=edges)
        # The hostile participant (client 1's keys), before the real client 1 starts
        answers = H.participant_calls(own_edge, root / "keys", client=1, num_clients=2)
        observed["participant_answers"] = [f"{type(a).__name__}: {str(a)[:80]}" for a in answers]
        part_replies = _send_many(
            own_edge, [*H.pickle_frames(H.Exploit(markers["participant"])), *H.pickle_frames(H.FromFile(files["server_key"], 32))]
        )
        observed["participant_sealed_pickle"] = repr(
            H.sealed_payload(own_edge, root / "keys", client=1, num_clients=2, payload=H.Exploit(markers["participant"]))
        )[:200]
        # (generation: client 1 is not in the job; client 0 generates alone)
        honest_clients = [client0] if placement.generation else [client0, _start_client(fed, 1, placement, root)]
        _wait_for(lambda: _clients_training(fed, len(honest_clients)) or client0.popen.poll() is not None, 90)
        attacks_started = time.monotonic()
        # The stranger, while the clients train: every port the server side listens on, at each of
        # its addresses (what connects and is not an edge; a store's write); a handshake with its
        # own key; then, with 200 connections held open, pickles, method codes outside the table and junk
        reached = H.reach([(a, port) for name, bound in listening.items() for port in sorted({p for _, p in bound}) for a in addresses[name]])
        observed["reachable_non_edge"] = [t for t in reached["connected"] if t not in {f"{a}:{port}" for a, port in edges}]
        observed["stores_writable"] = reached["stores_writable"]
        stranger_key = root / "stranger.key"
        generate_identity(stranger_key)
        refusal = H.stranger_handshake(edges[0], root / "keys", client=0, num_clients=2, stranger_key=stranger_key)
        observed["stranger_handshake"] = f"{type(refusal).__name__}: {str(refusal)[:120]}"
        clients_listening: dict[str, set[int]] = {p.name: set() for p in honest_clients}
        junk = H.junk_frames(random.Random(0))
        replies: list[bytes] = []
        off_table: list[bytes] = []
        junk_replies: list[bytes] = []
        with H.connections(edges[0], FLOOD) as held:
            observed["flood_held"] = len(held)
            pickles = [H.Exploit(markers["stranger"]), H.FromFile(files["server_key"], 32), H.FromFile(files["train0"], 32)]
            for edge in edges:
                replies += _send_many(edge, [frame for payload in pickles for frame in H.pickle_frames(payload)])
                off_table += _send_many(edge, [H.raw_frame(m, 0, k, [H.bytes_tensor(bytes(68))], ftype=t) for m, k, t in H.OFF_TABLE_REQUESTS])
                junk_replies += _send_many(edge, [data for family in junk.values() for data in family])
            observed["attacks_while_training"] = all(p.popen.poll() is None for p in honest_clients)
            attacks_ended = time.monotonic()
            while client0.popen.poll() is None and time.monotonic() < deadline:
                for proc in honest_clients:
                    if proc.popen.poll() is None:
                        clients_listening[proc.name] |= H.listening_ports(proc.popen.pid)
                time.sleep(0.5)
        # how long the attacks took, and how much longer the clients trained (--steps leaves a margin)
        observed["attack_seconds"] = round(attacks_ended - attacks_started, 1)
        observed["training_after_attacks_seconds"] = round(time.monotonic() - attacks_ended, 1)
        codes = {}
        for proc in fed.processes:
            try:
                codes[proc.name] = fed.wait(proc, timeout_s=max(1.0, deadline - time.monotonic()))
            except FederationFailed:
                codes[proc.name] = -9
    observed["exit_codes"] = codes
    observed["clients_listening"] = {k: sorted(v) for k, v in clients_listening.items()}
    honest = all(code == 0 for code in codes.values())
    summary_file = generation_summary_path(run_dir) if placement.generation else run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    observed["edge"] = summary.get("edge", {})
    if honest:
        attacked, reference = _trained_state(run_dir, placement), unattacked_state(root, config, placement)
        observed["state_unchanged"] = sorted(attacked) == sorted(reference) and all(torch.equal(attacked[k], reference[k]) for k in attacked)
    else:
        observed["state_unchanged"] = False
    peer_unreachable = not any(clients_listening.values())
    refused = [isinstance(a, BaseException) for a in answers]
    no_rpc = not observed["reachable_non_edge"] and not observed["stores_writable"]
    leaked = any(secrets.leaked(r) for r in [*part_replies, *replies, *off_table, *junk_replies])
    off_table_answered = any(_answered_not_refused(r) for r in off_table)
    outcome = {
        ("eval on the server", "participant"): not (no_rpc and all(refused)),
        ("eval on the server", "stranger"): not no_rpc or off_table_answered,
        ("eval on the peer client", "participant"): not peer_unreachable,
        ("eval on the peer client", "stranger"): not peer_unreachable,
        ("pickle runs a command on the server", "participant"): markers["participant"].exists(),
        ("pickle runs a command on the server", "stranger"): markers["stranger"].exists(),
        ("pickle runs a command on the peer client", "participant"): not peer_unreachable,
        ("pickle runs a command on the peer client", "stranger"): not peer_unreachable,
        ("torch.from_file: server's private key", "participant"): leaked or not no_rpc,
        ("torch.from_file: server's private key", "stranger"): leaked or not no_rpc,
        ("torch.from_file: peer's training file", "participant"): leaked or not peer_unreachable,
        ("torch.from_file: peer's training file", "stranger"): leaked or not peer_unreachable,
        ("rpc.remote object on the server", "participant"): not no_rpc,
        ("rpc.remote object on the server", "stranger"): not no_rpc,
        ("rpc.remote object on the peer client", "participant"): not peer_unreachable,
        ("rpc.remote object on the peer client", "stranger"): not peer_unreachable,
        ("join a rendezvous store / RPC group", "participant"): not no_rpc,
        ("join a rendezvous store / RPC group", "stranger"): not no_rpc,
        ("call a non-public function / method code", "participant"): not all(refused),
        ("call a non-public function / method code", "stranger"): off_table_answered,
        ("handshake with an unlisted key", "stranger"): refusal is None,
        ("oversize, truncated, random frames", "stranger"): not honest or observed["edge"].get("malformed_frames", 0) < len(junk["random"]) // 2,
        (f"{FLOOD} connections at once", "stranger"): not honest,
    }
    return outcome, honest, observed


def _answered_not_refused(reply: bytes) -> bool:
    """A reply frame to a request outside the table that is not an error frame."""
    if len(reply) < H.F.PREFIX.size:
        return False
    fields = H.F.PREFIX.unpack_from(reply)
    return fields[0] == H.F.MAGIC and fields[2] != H.F.FrameType.ERROR


# ---------------------------------------------------------------- report


def table(outcomes: dict[str, dict[tuple[str, str], bool]], honest: dict[str, bool], observed: dict[str, Any]) -> str:
    modes = list(outcomes)
    head = "| attack | attacker | " + " | ".join(f"`{m}`" for m in modes) + " |"
    lines = [head, "|" + "---|" * (2 + len(modes))]
    for row, who in ROWS:
        cells = ["**SUCCEEDED**" if outcomes[m][(row, who)] else "refused" for m in modes]
        lines.append(f"| {row} | {who} | " + " | ".join(cells) + " |")
    lines.append("| *honest clients finished (exit 0)* | | " + " | ".join("yes" if honest[m] else "**NO**" for m in modes) + " |")
    unchanged = {True: "yes", False: "**NO**", None: "not compared"}
    lines.append("| *trained state bit for bit as unattacked* | | " + " | ".join(unchanged[observed[m].get("state_unchanged")] for m in modes) + " |")
    lines.append(f"| *succeeded (of {len(ROWS)})* | | " + " | ".join(str(sum(outcomes[m].values())) for m in modes) + " |")
    return "\n".join(lines)


MODES = {
    "rpc": "torch RPC (one trust domain), loopback",
    "socket": "socket link, 1 server, loopback",
    "socket-hosts": "socket link, 1 server, each party and the attacker on a network host of its own",
    "hierarchical-hosts": "socket link, 2 sub-servers on a network of their own + the clients' network, each party and the attacker on a host of its own",
    "generate-hosts": "socket link, generation (flglm generate --serve / --server), the server, the client and the attacker each on a host of its own",
}
HOSTS = {
    "socket-hosts": ["server0", "client0", "client1", "attacker"],
    "hierarchical-hosts": ["server0", "server1", "client0", "client1", "attacker"],
    "generate-hosts": ["server0", "client0", "attacker"],
}


def _run_mode(mode: str, root: Path, steps: int) -> tuple[dict[tuple[str, str], bool], bool, dict[str, Any]]:
    config, files = write_config(root, steps)
    secrets = Secrets(files)
    if mode == "rpc":
        return rpc_mode(root, config, files, secrets)
    if mode == "socket":
        return socket_mode(root, config, files, secrets)
    # On network hosts: the hosts are made here; the attack runs in a process on the attacker's
    # host (``--inside``), which starts the federation's processes on theirs.
    servers = [n for n in HOSTS[mode] if n.startswith("server")]
    with NetworkHosts(HOSTS[mode], cluster=servers if len(servers) > 1 else ()) as hosts:
        spec = root / "hosts.json"
        spec.write_text(json.dumps({n: asdict(h) for n, h in hosts.hosts.items()}))
        cmd = hosts["attacker"].command([sys.executable, str(Path(__file__).resolve()), "--inside", mode, "--keep", str(root), "--steps", str(steps)])
        with (root / "attacker.log").open("w") as log:
            done = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, timeout=TIMEOUT_S + 120)
    result = root / "result.json"
    if done.returncode != 0 or not result.is_file():
        raise SystemExit(f"hostile: the attacker's process failed (exit {done.returncode}); see {root / 'attacker.log'}")
    data = json.loads(result.read_text())
    return {(row, who): data["outcome"][f"{who}: {row}"] for row, who in ROWS}, data["honest"], data["observed"]


def _inside(mode: str, root: Path) -> int:
    """On the attacker's host: the socket mode against the federation on the other hosts."""
    hosts = {n: Host(**h) for n, h in json.loads((root / "hosts.json").read_text()).items()}
    config, files = root / "config.yaml", {"server_key": root / "keys" / "server.key", "train0": root / "data0" / "train.tsv"}
    placement = Placement(
        hosts={n: h for n, h in hosts.items() if n != "attacker"},
        sub_servers=sum(n.startswith("server") for n in hosts),
        generation=mode.startswith("generate"),
    )
    outcome, honest, observed = socket_mode(root, config, files, Secrets(files), placement)
    observed["attacker_address"] = hosts["attacker"].address
    data = {"outcome": {f"{who}: {row}": ok for (row, who), ok in outcome.items()}, "honest": honest, "observed": observed}
    (root / "result.json").write_text(json.dumps(data, default=str))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=None, help=f"comma-separated of {', '.join(MODES)} (default: all; the -hosts ones need root)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per client (default: 120 for rpc, 600 for the socket modes: the attacks must land while the clients train)",
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories here")
    parser.add_argument("--inside", default=None, help=argparse.SUPPRESS)  # the attacker's process, on its own host
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.inside:
        return _inside(args.inside, args.keep)
    ok, why = available()
    modes = args.modes.split(",") if args.modes else [m for m in MODES if ok or not m.endswith("-hosts")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}: choose from {', '.join(MODES)}")
    if any(m.endswith("-hosts") for m in modes) and not ok:
        parser.error(f"the -hosts modes need network namespaces: {why}")
    if not args.modes and not ok:
        print(f"hostile: skipping the -hosts modes ({why})", flush=True)
    started = time.monotonic()
    outcomes: dict[str, dict[tuple[str, str], bool]] = {}
    honest: dict[str, bool] = {}
    observed: dict[str, Any] = {}
    with TemporaryDirectory(prefix="flglm-hostile-") as tmp:
        base = args.keep or Path(tmp)
        for mode in modes:
            root = base / mode
            root.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            steps = args.steps or (120 if mode == "rpc" else 600)
            outcomes[mode], honest[mode], observed[mode] = _run_mode(mode, root, steps)
            observed[mode]["seconds"] = round(time.monotonic() - t0, 1)
            print(
                f"{mode}: {sum(outcomes[mode].values())} of {len(ROWS)} attacks succeeded; honest clients finished: {honest[mode]} ({observed[mode]['seconds']} s)",
                flush=True,
            )
    print()
    print(table(outcomes, honest, observed))
    print()
    for mode in modes:
        print(f"`{mode}`: {MODES[mode]}")
    for mode, seen in observed.items():
        print(f"{mode} observed: " + json.dumps(seen, default=str)[:4000])
    cross_org = [m for m in outcomes if m != "rpc"]
    line = {
        "benchmark": "hostile",
        "succeeded": sum(sum(outcomes[m].values()) for m in cross_org) if cross_org else None,
        "succeeded_by_mode": {m: sum(o.values()) for m, o in outcomes.items()},
        "attacks": len(ROWS),
        "honest_clients_finished": honest,
        "state_unchanged": {m: observed[m].get("state_unchanged") for m in modes},
        "modes": {m: MODES[m] for m in modes},
        "outcomes": {m: {f"{who}: {row}": ("succeeded" if ok else "refused") for (row, who), ok in o.items()} for m, o in outcomes.items()},
        "edge": {m: observed[m].get("edge") for m in modes if m != "rpc"},
        "server_listening": {m: observed[m].get("server_listening") for m in modes if m != "rpc"},
        "edges": {m: observed[m].get("edges") for m in modes if m != "rpc"},
        "attacks_while_training": {m: all(v for k, v in o.items() if k.endswith("attacks_while_training")) for m, o in observed.items()},
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(line))
    late = [m for m, ok in line["attacks_while_training"].items() if not ok]
    if late:
        print(f"hostile: in {late} the run ended before the attacks did: their 'refused' proves nothing; raise --steps", file=sys.stderr)
        return 1
    # the rpc mode's failures are what it measures; a socket mode's are the benchmark failing
    return 0 if all(honest[m] for m in cross_org) and all(line["state_unchanged"][m] for m in cross_org) else 1


if __name__ == "__main__":
    sys.exit(main())
