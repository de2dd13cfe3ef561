"""Attacks on a running federation's link, from outside its processes (tests, ``benchmarks/hostile.py``).

A *stranger* holds no key; a *hostile participant* holds one client's valid keys. Each function
here makes real connections to real ports and returns what came back, so the caller decides
what counts as refused. Nothing here is used by a federation itself.
"""

from __future__ import annotations

import datetime
import os
import pickle
import random
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

from flglm.crypto.keyring import load_client_keys
from flglm.crypto.sessions import ClientSession
from flglm.link import frames as F
from flglm.link.socket_transport import SocketReader, SocketTransport


class Exploit:
    """An object whose unpickling runs ``touch marker``: the marker file must never appear."""

    def __init__(self, marker: Path | str) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


class FromFile:
    """An object whose unpickling calls ``torch.from_file(path)``: the file's bytes must never come back."""

    def __init__(self, path: Path | str, nbytes: int) -> None:
        self.path, self.nbytes = str(path), nbytes

    def __reduce__(self) -> tuple:
        return (torch.from_file, (self.path, False, self.nbytes))


def send_raw(address: tuple[str, int], data: bytes, *, read: bool = True, timeout_s: float = 1.0) -> bytes:
    """Send raw bytes on a new connection; what the peer answers before it closes (or ``timeout_s``)."""
    try:
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(data)
            if not read:
                return b""
            sock.settimeout(timeout_s)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)
    except OSError:  # refused, reset, or nothing within the time
        return b""


def raw_frame(method: int, client_id: int, kind: int, tensors: list[torch.Tensor], *, ftype: int = 1) -> bytes:
    """A frame with any method, kind and frame-type codes (valid or not) around well-formed tensors."""
    good = b"".join(bytes(b) for b in F.encode(F.Frame(F.FrameType.REQUEST, F.Method.EXCHANGE, client_id, "join", tensors=tensors)))
    fields = list(F.PREFIX.unpack_from(good))
    fields[2], fields[3], fields[4] = ftype, method, kind
    return F.PREFIX.pack(*fields) + good[F.PREFIX.size :]


def bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def pickle_frames(payload: object) -> list[bytes]:
    """``payload`` pickled, as the whole stream and inside each of the three methods' frames."""
    blob = pickle.dumps(payload)
    return [blob, *(raw_frame(method, 0, kind, [bytes_tensor(blob)]) for method, kind in ((1, 0), (2, 1), (3, 1)))]


def junk_frames(rng: random.Random) -> dict[str, list[bytes]]:
    """Oversize (a terabyte announced), truncated and random frames, by family."""
    hello = raw_frame(1, 0, 0, [bytes_tensor(bytes(68))])
    return {
        "oversize": [F.PREFIX.pack(F.MAGIC, F.VERSION, 1, 1, 0, 0, 0, 0, 2**40, 1), F.PREFIX.pack(F.MAGIC, F.VERSION, 1, 3, 1, 0, 0, 0, 2**62, 16)],
        "truncated": [hello[: len(hello) // 2], hello[:10], hello[:-1]],
        "random": [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))) for _ in range(20)]
        + [F.MAGIC + bytes([F.VERSION]) + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))) for _ in range(20)],
    }


def _proven_transport(address: tuple[str, int], key_dir: Path, client: int, num_clients: int) -> tuple[SocketTransport, ClientSession]:
    """A connection that shook hands as ``client`` with its keys and proved itself with a sealed message."""
    keys = load_client_keys(key_dir, client, num_clients)
    session = ClientSession(client, keys.identity, keys.server_key, max_message_bytes=1 << 20)
    transport = SocketTransport(*address, timeout_s=10, max_frame_bytes=1 << 20)
    session.finish(transport.call("handshake", client, session.hello()))
    return transport, session


OFF_TABLE_REQUESTS = ((4, 0, 1), (0, 0, 1), (255, 0, 1), (3, 99, 1), (3, 0, 1), (1, 0, 2), (1, 0, 3))
"""(method, kind, frame type) codes of requests for anything but the three entries."""


def participant_calls(address: tuple[str, int], key_dir: Path, *, client: int, num_clients: int) -> list[BaseException | None]:
    """Client ``client``'s valid keys: a proven connection, then a sealed call it may not make
    (before it joined), then on fresh proven connections requests with method, kind or frame
    type codes outside the table. Returns what the edge answered each (an exception, or None
    where it answered something else)."""
    transport, session = _proven_transport(address, key_dir, client, num_clients)
    answers: list[BaseException | None] = [transport.call("sealed", client, "grad_norms", session.seal("grad_norms", []))]
    for method, kind, ftype in OFF_TABLE_REQUESTS:
        t2, s2 = _proven_transport(address, key_dir, client, num_clients)
        t2.call("sealed", client, "grad_norms", s2.seal("grad_norms", []))
        sock = t2._sock
        assert sock is not None
        sock.sendall(raw_frame(method, client, kind, [s2.hello()], ftype=ftype))
        try:
            reply = F.read_frame(SocketReader(sock, time.monotonic() + 10), F.FrameLimits(max_frame_bytes=1 << 16))
            answers.append(reply.error)
        except (OSError, F.FrameError) as exc:  # closed without an answer: refused too
            answers.append(exc)
        t2.close()
    transport.close()
    return answers


def sealed_payload(address: tuple[str, int], key_dir: Path, *, client: int, num_clients: int, payload: object) -> object:
    """``payload`` pickled, sealed under ``client``'s own session as a message of a real kind; what the edge answered."""
    transport, session = _proven_transport(address, key_dir, client, num_clients)
    try:
        return transport.call("sealed", client, "grad_norms", session.seal("grad_norms", [bytes_tensor(pickle.dumps(payload))]))
    except Exception as exc:  # noqa: BLE001 - a refusal is what we measure
        return exc
    finally:
        transport.close()


def stranger_handshake(address: tuple[str, int], key_dir: Path, *, client: int, num_clients: int, stranger_key: Path) -> BaseException | None:
    """A handshake as ``client`` with a private key the server does not list; the error it got (None: accepted)."""
    from flglm.crypto.keys import load_identity

    keys = load_client_keys(key_dir, client, num_clients)
    session = ClientSession(client, load_identity(stranger_key), keys.server_key, max_message_bytes=1 << 20)
    transport = SocketTransport(*address, timeout_s=10, max_frame_bytes=1 << 20)
    try:
        reply = transport.call("handshake", client, session.hello())
        if isinstance(reply, BaseException):
            return reply
        session.finish(reply)
        return None
    except Exception as exc:  # noqa: BLE001 - a refusal is what we measure
        return exc
    finally:
        transport.close()


@contextmanager
def connections(address: tuple[str, int], count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections opened at once and held (those the peer refuses are left out)."""
    socks: list[socket.socket] = []
    for _ in range(count):
        try:
            socks.append(socket.create_connection(address, timeout=10))
        except OSError:
            continue
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` (and its children) listen on, as a port scan of its host would find."""
    return {port for _, port in listening_sockets(pid)}


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """The (address, port) pairs process ``pid`` (and its children) listen on over TCP.

    Read from ``/proc/PID/net/tcp{,6}``, the process's own network namespace, matched to its
    socket inodes: psutil reads the caller's ``/proc/net``, which from another network host
    (namespace) finds none of a process's sockets."""
    try:
        root = psutil.Process(pid)
        pids = [root.pid, *(c.pid for c in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return set()
    found: set[tuple[str, int]] = set()
    for each in pids:
        try:
            inodes = {_socket_inode(f"/proc/{each}/fd/{fd}") for fd in os.listdir(f"/proc/{each}/fd")} - {""}
            for table in ("tcp", "tcp6"):
                for line in Path(f"/proc/{each}/net/{table}").read_text().splitlines()[1:]:
                    fields = line.split()
                    if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                        address, port = fields[1].rsplit(":", 1)
                        found.add((_proc_address(address), int(port, 16)))
        except (FileNotFoundError, ProcessLookupError, PermissionError):  # the process ended meanwhile
            continue
    return found


def _socket_inode(fd_path: str) -> str:
    """The inode of the socket an fd link points to ("socket:[N]"), or "" (not a socket, or closed)."""
    try:
        target = os.readlink(fd_path)
    except OSError:
        return ""
    return target[8:-1] if target.startswith("socket:[") else ""


def _proc_address(hex_address: str) -> str:
    """An address as /proc/net/tcp{,6} writes it (host byte order, 32-bit words) in dotted or colon form."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(words) == 4 else socket.AF_INET6, words)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """c10d logs each failed store connection (with a C++ backtrace) to file descriptor 2: hide it."""
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def store_access(host: str, port: int, *, timeout_s: float = 3.0) -> bool:
    """Whether a keyless process can write and read back a key in a torch TCPStore at ``host:port``
    (a torchrun rendezvous or RPC group store: unauthenticated)."""
    with _quiet_stderr():
        return _store_access(host, port, timeout_s)


def stores_writable(targets: list[tuple[str, int]], *, timeout_s: float = 3.0) -> list[tuple[str, int]]:
    """Those of ``targets`` where :func:`store_access` succeeds, all probed at once (one quiet stderr around them)."""
    from concurrent.futures import ThreadPoolExecutor

    with _quiet_stderr(), ThreadPoolExecutor(max(1, min(16, len(targets)))) as pool:
        taken = list(pool.map(lambda t: _store_access(t[0], t[1], timeout_s), targets))
    return [t for t, ok in zip(targets, taken) if ok]


def _store_access(host: str, port: int, timeout_s: float) -> bool:
    try:
        store = torch.distributed.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        store.set("flglm-hostile-probe", b"stranger")
        return store.get("flglm-hostile-probe") == b"stranger"
    except (RuntimeError, TimeoutError, OSError, ValueError):
        return False


def reach(targets: list[tuple[str, int]], *, timeout_s: float = 2.0) -> dict[str, list[str]]:
    """From this process's host: which ``targets`` accept a TCP connection, and at which of those
    a keyless process's TCPStore write is taken."""
    connected = []
    for host, port in targets:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                connected.append((host, port))
        except OSError:
            continue
    return {"connected": [f"{h}:{p}" for h, p in connected], "stores_writable": [f"{h}:{p}" for h, p in stores_writable(connected)]}


if __name__ == "__main__":  # python -m flglm.jobs.hostile reach HOST:PORT ... (run on the attacker's host)
    import json
    import sys

    if len(sys.argv) < 2 or sys.argv[1] != "reach":
        raise SystemExit("usage: python -m flglm.jobs.hostile reach HOST:PORT ...")
    pairs = [(t.rpartition(":")[0], int(t.rpartition(":")[2])) for t in sys.argv[2:]]
    print(json.dumps(reach(pairs)))
