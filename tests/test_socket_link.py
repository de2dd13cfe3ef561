"""The socket link on loopback, real processes: the same numbers as torch RPC, and the edge
refuses strangers, floods and a hostile participant while honest clients finish."""

from __future__ import annotations

import json
import os
import pickle
import random
import socket
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_federation import merged_weights, write_config

from flglm.crypto.keyring import load_client_keys
from flglm.crypto.sessions import ClientSession
from flglm.jobs.edge_processes import EdgeFederation
from flglm.jobs.hostile import bytes_tensor, raw_frame
from flglm.jobs.subprocesses import FederationFailed, run_federation
from flglm.link import frames as F
from flglm.link.socket_transport import SocketTransport

pytestmark = pytest.mark.multiprocess

TIMEOUT_S = 240.0


def test_the_socket_link_gives_the_same_losses_and_weights_as_torch_rpc(tmp_path: Path) -> None:
    # Prepare: one encrypted client, 2 epochs (a re-key handshake each), one thread per process
    config = write_config(tmp_path, data={"max_train_rows": 64}, trainer={"max_epochs": 2, "max_steps": -1})
    common = ["crypto.enabled=true", "server.num_threads=1"]
    runs = {"rpc": tmp_path / "rpc", "socket": tmp_path / "socket"}
    deadline = time.monotonic() + TIMEOUT_S

    # Execute
    run_federation(config, common, num_clients=1, run_dir=runs["rpc"], timeout_s=TIMEOUT_S)
    with EdgeFederation(config, common, num_clients=1, run_dir=runs["socket"]) as federation:
        federation.start_server(timeout_s=TIMEOUT_S)
        federation.start_client(0)
        federation.wait_all(deadline=deadline)

    # Assert: bit for bit
    losses = {k: json.loads((d / "client0" / "metrics.json").read_text())["losses"] for k, d in runs.items()}
    assert len(losses["rpc"]) == 16 and losses["rpc"] == losses["socket"]
    a, b = merged_weights(runs["rpc"]), merged_weights(runs["socket"])
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
    summary = json.loads((runs["socket"] / "summary.json").read_text())
    assert summary["link"]["encrypted"] and summary["link"]["rejected_messages"] == 0
    assert summary["edge"]["proven_connections"] == 1 and summary["edge"]["malformed_frames"] == 0


# ---------------------------------------------------------------- attackers


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _send(address: tuple[str, int], data: bytes, *, read: bool = True) -> bytes:
    """Send raw bytes on a new connection; what the edge answers before it closes (or 1 s)."""
    with socket.create_connection(address, timeout=5) as sock:
        try:
            sock.sendall(data)
            if not read:
                return b""
            sock.settimeout(1.0)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)
        except OSError:  # reset by the edge, or nothing within the second
            return b""


def _strangers(address: tuple[str, int], marker: Path, rng: random.Random) -> int:
    """A stranger without keys: random, truncated, oversize and pickled frames. Returns how many it sent."""
    blob = pickle.dumps(_Exploit(marker))
    hello_of_pickle = raw_frame(1, 0, 0, [bytes_tensor(blob)])
    attempts = [
        blob,  # a pickle as the whole stream
        hello_of_pickle,  # a pickle as a handshake's bytes
        raw_frame(2, 0, 1, [bytes_tensor(blob)]),  # a pickle in a clear exchange
        raw_frame(3, 0, 1, [bytes_tensor(blob)]),  # ... and as a sealed message
        F.PREFIX.pack(F.MAGIC, F.VERSION, 1, 1, 0, 0, 0, 0, 2**40, 1),  # a terabyte announced
        hello_of_pickle[: len(hello_of_pickle) // 2],  # truncated
    ]
    attempts += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))) for _ in range(20)]
    attempts += [F.MAGIC + bytes([F.VERSION]) + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))) for _ in range(20)]
    for data in attempts:
        _send(address, data)
    return len(attempts)


def _hostile_participant(address: tuple[str, int], key_dir: Path) -> list[Exception]:
    """Client 1's valid keys: a proven connection, then frames for anything but the three entries."""
    keys = load_client_keys(key_dir, 1, 2)
    session = ClientSession(1, keys.identity, keys.server_key, max_message_bytes=1 << 20)
    transport = SocketTransport(*address, timeout_s=10, max_frame_bytes=1 << 20)
    session.finish(transport.call("handshake", 1, session.hello()))
    refused = transport.call("sealed", 1, "grad_norms", session.seal("grad_norms", []))  # opens: proven, then refused
    errors = [refused]
    hello = session.hello()
    for method, kind, ftype in ((4, 0, 1), (0, 0, 1), (255, 0, 1), (3, 99, 1), (3, 0, 1), (1, 0, 2), (1, 0, 3)):
        raw = raw_frame(method, 1, kind, [hello], ftype=ftype)
        with socket.create_connection(address, timeout=5) as sock:  # a fresh connection, proven first
            s2 = ClientSession(1, keys.identity, keys.server_key, max_message_bytes=1 << 20)
            t2 = SocketTransport(*address, timeout_s=10, max_frame_bytes=1 << 20)
            t2._sock = sock
            s2.finish(t2.call("handshake", 1, s2.hello()))
            t2.call("sealed", 1, "grad_norms", s2.seal("grad_norms", []))
            sock.sendall(raw)
            reply = F.read_frame(_reader(sock), F.FrameLimits(max_frame_bytes=1 << 16))
            errors.append(reply.error)
    transport.close()
    return errors


def _reader(sock: socket.socket):
    from flglm.link.socket_transport import SocketReader

    return SocketReader(sock, time.monotonic() + 10)


def _listening(pid: int) -> list[tuple]:
    conns = psutil.Process(pid).net_connections(kind="inet")
    return [c.laddr for c in conns if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM)]


def test_strangers_floods_and_a_hostile_participant_are_refused_while_honest_clients_finish(tmp_path: Path) -> None:
    # Prepare: 2 encrypted clients; the edge holds at most 64 connections, unproven ones get 3 s
    config = write_config(tmp_path, data={"max_train_rows": 64}, trainer={"max_epochs": 2, "max_steps": -1})
    overrides = ["crypto.enabled=true", "link.max_connections=64", "link.first_frame_timeout_s=3", "server.startup_timeout_s=120"]
    marker = tmp_path / "pwned"
    deadline = time.monotonic() + TIMEOUT_S
    with EdgeFederation(config, overrides, num_clients=2, run_dir=tmp_path / "run") as federation:
        server = federation.start_server(timeout_s=TIMEOUT_S)
        address = federation.address
        assert address is not None

        # Execute: the hostile participant (client 1's keys) and the strangers' junk before client 1
        # starts (the run itself takes about a second: attacks sent during it could find the server
        # already done); then the honest clients train while 200 connections are held open
        try:
            hostile = _hostile_participant(address, tmp_path / "keys")
            sent = _strangers(address, marker, random.Random(0))
            flood = [socket.create_connection(address, timeout=10) for _ in range(200)]
            clients = [federation.start_client(i) for i in (0, 1)]
        except OSError as exc:
            raise FederationFailed(f"an attacker could not reach the edge: {exc!r}.\n{federation.describe()}") from exc
        listening: dict[str, list] = {}
        while clients[0].popen.poll() is None and time.monotonic() < deadline:
            for process in (*clients, server):
                if process.popen.poll() is None:
                    listening.setdefault(process.name, []).extend(_listening(process.popen.pid))
            time.sleep(0.5)
        codes = federation.wait_all(deadline=deadline)
        for sock in flood:
            sock.close()

    # Assert: everyone honest exited 0; nothing the strangers sent ran; each was counted
    assert codes == {"server": 0, "client0": 0, "client1": 0}
    assert not marker.exists()
    assert not listening.get("client0") and not listening.get("client1"), listening  # clients accept nothing
    assert {a.port for a in listening["server"]} == {address[1]}  # the server: its edge, no RPC agent
    assert type(hostile[0]).__name__ == "InvalidMessageError" and "has not joined" in str(hostile[0])
    assert all(isinstance(e, F.FrameError) for e in hostile[1:]), hostile
    edge = json.loads((tmp_path / "run" / "summary.json").read_text())["edge"]
    assert edge["malformed_frames"] >= sent // 2 and edge["handshakes_refused"] >= 1 and edge["proven_connections"] >= 2 + len(hostile)
    assert edge["evicted"] + edge["timeouts"] >= 136  # 200 idle connections into 64 places
    losses = [json.loads((tmp_path / "run" / f"client{i}" / "metrics.json").read_text())["losses"] for i in (0, 1)]
    assert all(len(l) == 8 for l in losses)


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
