"""The server's edge: the one listening socket clients of other organisations reach.

It reads frames (:mod:`flglm.link.frames`) with per-connection bounds and hands each to the
endpoint's three entries through a fixed table; nothing else of the server is reachable, no
byte is unpickled, and no torch RPC agent is involved. One thread per connection, at most
``max_connections`` of them.

A new connection's first frame must come within ``first_frame_timeout_s``. With encryption
on, it may be only a handshake frame (at most
:data:`~flglm.link.frames.HANDSHAKE_FRAME_BYTES`, within ``first_frame_timeout_s``); it speaks
for the client id of that handshake from then on, and is *proven* once a sealed message of it
has opened. A connection refused at the handshake, or whose first sealed message does not
open, is answered, closed, logged and counted, so a stranger's work is bounded: one small
frame, or one handshake with a public key and one failed decryption. When the edge is full,
the oldest unproven connection makes room, those that never shook hands first (an honest
client shakes hands as soon as it connects); proven connections are capped per client.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from flglm.crypto.errors import ChannelError
from flglm.link import frames as F
from flglm.link.rpc_entries import EndpointSurface
from flglm.link.socket_transport import SocketReader, send_all

log = logging.getLogger("flglm.server.edge")


@dataclass
class _Connection:
    sock: socket.socket
    peer: str
    opened: float
    client_id: int | None = None
    handshaken: bool = False
    proven: bool = False
    busy: bool = False
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class Edge:
    """Listens on ``host:port`` (0: a free port) and serves ``endpoint``'s three entries."""

    def __init__(
        self,
        endpoint: EndpointSurface,
        *,
        host: str,
        port: int,
        encrypted: bool,
        max_frame_bytes: int,
        first_frame_timeout_s: float,
        call_timeout_s: float,
        max_connections: int,
        max_connections_per_client: int,
    ) -> None:
        self.endpoint = endpoint
        self.encrypted = encrypted
        self.limits = F.FrameLimits(max_frame_bytes=max_frame_bytes)
        self.first_frame_timeout_s = first_frame_timeout_s
        self.call_timeout_s = call_timeout_s
        self.max_connections = max_connections
        self.max_per_client = max_connections_per_client
        self.stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._listener = socket.create_server((host, port), backlog=1024, reuse_port=False)
        self._listener.settimeout(0.2)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._handlers = {F.Method.HANDSHAKE: self._handshake, F.Method.EXCHANGE: self._exchange, F.Method.SEALED: self._sealed}
        self._acceptor = threading.Thread(target=self._accept_loop, name="edge-accept", daemon=True)

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def start(self) -> tuple[str, int]:
        self._acceptor.start()
        log.info("edge listening on %s:%d (encryption %s)", *self.address, "on" if self.encrypted else "OFF")
        return self.address

    # ------------------------------------------------------------ connections
    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(sock, f"{peer[0]}:{peer[1]}", time.monotonic())
            if not self._admit(conn):
                self._count("refused_full", 1)
                _close(sock)
                continue
            self._count("accepted", 1)
            threading.Thread(target=self._serve, args=(conn,), name=f"edge-{conn.peer}", daemon=True).start()

    def _admit(self, conn: _Connection) -> bool:
        """Room for ``conn``: the oldest idle unproven connection is closed when the edge is full."""
        with self._lock:
            self._connections = [c for c in self._connections if not c.closed]
            if len(self._connections) >= self.max_connections:
                idle = [c for c in self._connections if not c.proven and not c.busy]
                if not idle:
                    return False
                victim = min(idle, key=lambda c: (c.handshaken, c.opened))  # strangers that never shook hands first
                self._drop(victim, "evicted to make room (edge full)", "evicted")
                self._connections.remove(victim)
            self._connections.append(conn)
            self.stats["peak_connections"] = max(self.stats["peak_connections"], len(self._connections))
            return True

    def _prove(self, conn: _Connection) -> None:
        """``conn`` spoke a sealed message that opened; keep at most ``max_per_client`` of its client's."""
        conn.proven = True
        self._count("proven_connections", 1)
        with self._lock:
            mine = sorted((c for c in self._connections if c.proven and not c.closed and c.client_id == conn.client_id), key=lambda c: c.opened)
            for old in mine[: max(0, len(mine) - self.max_per_client)]:
                self._drop(old, f"client {conn.client_id} has {len(mine)} connections", "evicted_client_connections")

    def _drop(self, conn: _Connection, why: str, counter: str | None = None) -> None:
        with conn.lock:
            if conn.closed:
                return
            conn.closed = True
        if counter:
            self._count(counter)
        log.log(logging.INFO if conn.proven else logging.WARNING, "edge: closing %s (client %s): %s", conn.peer, conn.client_id, why)
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        _close(conn.sock)

    # ------------------------------------------------------------ frames
    def _serve(self, conn: _Connection) -> None:
        prefix: F.Prefix | None = None
        try:
            while not conn.closed:
                prefix = None
                first = not conn.handshaken
                unproven = not conn.proven
                # A new connection has first_frame_timeout_s for its handshake; a handshaken one not
                # yet proven (an honest client loads its data between handshake and join) waits up to
                # call_timeout_s, and the edge closes it first when full; a proven one may stay idle.
                wait = self.first_frame_timeout_s if first else self.call_timeout_s if unproven else None
                reader = SocketReader(conn.sock, None if wait is None else time.monotonic() + wait)
                handshake_first = first and self.encrypted
                prefix = F.read_prefix(reader, F.FrameLimits(max_frame_bytes=2**63) if handshake_first else self.limits)
                self._check_speaker(conn, prefix)
                if handshake_first and prefix.body_length > F.HANDSHAKE_FRAME_BYTES:
                    raise F.FrameError(f"a handshake frame is at most {F.HANDSHAKE_FRAME_BYTES} bytes, got {prefix.body_length}")
                if unproven:
                    reader.deadline = time.monotonic() + self.first_frame_timeout_s
                else:
                    conn.sock.settimeout(self.call_timeout_s)
                frame = F.read_body(prefix, reader)
                self._count("frames_in", 1)
                self._count("bytes_in", reader.bytes)
                F.check_request(frame)
                conn.busy = True
                try:
                    reply = self._handlers[frame.method](conn, frame)
                    self._count("bytes_out", send_all(conn.sock, F.encode(reply), time.monotonic() + self.call_timeout_s))
                finally:
                    conn.busy = False
                self._count("frames_out", 1)
                if not self.encrypted and not conn.proven:  # nothing to prove without keys: its first answered frame admits it
                    conn.client_id, conn.handshaken = frame.client_id, True
                    self._prove(conn)
                if reply.type == F.FrameType.ERROR and unproven and isinstance(reply.error, ChannelError):
                    self._drop(conn, f"refused before proving itself: {reply.error}", "refused_unproven")
        except F.FrameError as exc:
            self._count("malformed_frames", 1)
            self._refuse(conn, exc, prefix)
        except TimeoutError:
            self._drop(conn, "no frame in time", "timeouts")
        except OSError as exc:  # reset, closed mid-frame, or closed by _drop
            self._drop(conn, f"connection ended ({exc})")
        finally:
            self._drop(conn, "done")

    def _check_speaker(self, conn: _Connection, prefix: F.Prefix) -> None:
        if prefix.type != F.FrameType.REQUEST:
            raise F.FrameError(f"expected a request frame, got {prefix.type.name}")
        if self.encrypted and not conn.handshaken and prefix.method != F.Method.HANDSHAKE:
            raise F.FrameError("this edge requires encryption (crypto.enabled=true): a connection starts with a handshake")
        if self.encrypted and prefix.method == F.Method.EXCHANGE:
            raise F.FrameError("this edge requires encryption (crypto.enabled=true): clear messages are refused")
        if conn.client_id is not None and prefix.client_id != conn.client_id:
            raise F.FrameError(f"this connection speaks for client {conn.client_id}, not {prefix.client_id}")

    def _refuse(self, conn: _Connection, exc: Exception, prefix: F.Prefix | None) -> None:
        """Tell the peer what was wrong (best effort, bounded; echoing its frame's prefix if it was readable), then close."""
        if not conn.closed:
            echo = (prefix.method, prefix.client_id, prefix.kind, prefix.round, prefix.step) if prefix else (F.Method.HANDSHAKE, 0, None, 0, 0)
            try:
                send_all(conn.sock, F.encode(F.Frame(F.FrameType.ERROR, *echo, error=exc)), time.monotonic() + 1.0)
            except OSError:
                pass
        self._drop(conn, f"malformed frame: {exc}")

    # ------------------------------------------------------------ the three entries
    def _reply(self, frame: F.Frame, result: Any) -> F.Frame:
        if isinstance(result, torch._C.Future):
            try:
                result = result.wait()
            except Exception as exc:  # noqa: BLE001 - the endpoint's refusal, sent back as an error frame
                result = exc
        if isinstance(result, Exception):
            return F.Frame(F.FrameType.ERROR, frame.method, frame.client_id, frame.kind, frame.round, frame.step, error=result)
        tensors = list(result) if isinstance(result, list | tuple) else [result]
        return F.Frame(F.FrameType.REPLY, frame.method, frame.client_id, frame.kind, frame.round, frame.step, tensors)

    def _call(self, frame: F.Frame, entry: Any, *args: Any) -> F.Frame:
        try:
            return self._reply(frame, entry(*args))
        except Exception as exc:  # noqa: BLE001 - as above
            return self._reply(frame, exc)

    def _handshake(self, conn: _Connection, frame: F.Frame) -> F.Frame:
        reply = self._call(frame, self.endpoint.handshake, frame.client_id, frame.tensors[0])
        if reply.type == F.FrameType.ERROR:
            self._count("handshakes_refused", 1)
            log.warning("edge: %s refused at the handshake as client %d: %s", conn.peer, frame.client_id, reply.error)
            self._refuse_after(conn, reply)
        else:
            conn.client_id, conn.handshaken = frame.client_id, True
        return reply

    def _refuse_after(self, conn: _Connection, reply: F.Frame) -> None:
        try:
            send_all(conn.sock, F.encode(reply), time.monotonic() + 1.0)
        except OSError:
            pass
        self._drop(conn, f"refused: {reply.error}")
        raise ConnectionAbortedError("refused")

    def _exchange(self, conn: _Connection, frame: F.Frame) -> F.Frame:
        return self._call(frame, self.endpoint.exchange, frame.client_id, frame.kind, frame.round, frame.step, frame.tensors)

    def _sealed(self, conn: _Connection, frame: F.Frame) -> F.Frame:
        result = self.endpoint.sealed(frame.client_id, frame.kind, frame.tensors[0])
        if not conn.proven:
            failed = isinstance(result, torch._C.Future) and result.done() and _exception_of(result)
            if not isinstance(failed, ChannelError):
                self._prove(conn)
        return self._call(frame, lambda: result)

    # ------------------------------------------------------------ shutdown
    def close(self, *, wait_s: float = 10.0) -> None:
        """Stop accepting; let answers being written finish (at most ``wait_s``), then close every connection."""
        self._closing.set()
        _close(self._listener)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(c.busy for c in list(self._connections)):
            time.sleep(0.02)
        time.sleep(0.05)  # the last answer's bytes leave after its handler marks itself idle
        for conn in list(self._connections):
            self._drop(conn, "the server is shutting down")
        self._acceptor.join(timeout=2)

    def summary(self) -> dict[str, int]:
        keys = (
            "accepted", "refused_full", "evicted", "evicted_client_connections", "peak_connections", "proven_connections",
            "handshakes_refused", "refused_unproven", "malformed_frames", "timeouts", "frames_in", "frames_out", "bytes_in", "bytes_out",
        )  # fmt: skip
        return {"address": f"{self.address[0]}:{self.address[1]}", **{k: int(self.stats[k]) for k in keys}}  # type: ignore[dict-item]


def _exception_of(future: torch._C.Future) -> BaseException | None:
    try:
        future.wait()
    except BaseException as exc:  # noqa: BLE001
        return exc
    return None


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
