"""A client's transport over one TCP connection to the server's edge (no RPC, no listening socket).

Each call is one request frame (:mod:`flglm.link.frames`) and one reply frame, bounded by
``timeout_s``. Any failure of the connection (refused, reset, timed out, a malformed reply)
closes it and raises :class:`~flglm.link.transport.TransportError`; the next call connects
again, so :class:`~flglm.client.server_link.ServerLink`'s resends work unchanged. The
server's refusal comes back as an exception object, as with the other transports.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from typing import Any

import torch

from flglm.link import frames as F
from flglm.link.transport import TransportError


def send_all(sock: socket.socket, buffers: Sequence[memoryview | bytes], deadline: float | None) -> int:
    """Write every buffer in order with ``sendmsg`` (no joining copy); returns the bytes sent."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    total = sum(v.nbytes for v in views)
    while views:
        _set_timeout(sock, deadline)
        sent = sock.sendmsg(views[:512])
        while sent:
            if sent >= views[0].nbytes:
                sent -= views[0].nbytes
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0
    return total


def _set_timeout(sock: socket.socket, deadline: float | None) -> None:
    if deadline is None:
        sock.settimeout(None)
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("the call's time ran out")
    sock.settimeout(remaining)


class SocketReader:
    """``read_into`` for :mod:`flglm.link.frames` over a socket, bounded by a deadline."""

    def __init__(self, sock: socket.socket, deadline: float | None = None) -> None:
        self.sock = sock
        self.deadline = deadline
        self.bytes = 0

    def __call__(self, view: memoryview) -> None:
        view = view.cast("B")
        while view.nbytes:
            _set_timeout(self.sock, self.deadline)
            n = self.sock.recv_into(view)
            if n == 0:
                raise ConnectionError("the peer closed the connection")
            self.bytes += n
            view = view[n:]


def request_frame(method: str, args: tuple[Any, ...]) -> F.Frame:
    """The request frame of one endpoint call, from the arguments a ServerLink passes."""
    code = F.METHOD_OF_NAME.get(method)
    if code is None:
        raise ValueError(f"the socket link carries only {sorted(F.METHOD_OF_NAME)}, not {method!r}")
    if code == F.Method.HANDSHAKE:
        client_id, hello = args
        return F.Frame(F.FrameType.REQUEST, code, client_id, tensors=[hello])
    if code == F.Method.SEALED:
        client_id, kind, message = args
        return F.Frame(F.FrameType.REQUEST, code, client_id, kind, tensors=[message])
    client_id, kind, round_index, step, tensors = args
    return F.Frame(F.FrameType.REQUEST, code, client_id, kind, round_index, step, list(tensors))


class SocketTransport:
    """Calls the server's endpoint through its edge at ``host:port``, each call bounded by ``timeout_s``."""

    def __init__(self, host: str, port: int, *, timeout_s: float, max_frame_bytes: int) -> None:
        self.address = (host, port)
        self.timeout_s = timeout_s
        self.limits = F.FrameLimits(max_frame_bytes=max_frame_bytes)
        self._sock: socket.socket | None = None
        self.connects = 0

    def _connect(self, deadline: float) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection(self.address, timeout=max(0.001, deadline - time.monotonic()))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
            self.connects += 1
        return self._sock

    def wait_until_reachable(self, timeout_s: float) -> None:
        """Connect, retrying until ``timeout_s`` has passed (the server may still be starting)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._connect(time.monotonic() + min(5.0, max(0.1, deadline - time.monotonic())))
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(
                        f"the server's edge at {self.address[0]}:{self.address[1]} is not reachable within {timeout_s:g}s ({exc}); is the server running?"
                    ) from None
                time.sleep(0.2)

    def call(self, method: str, *args: Any) -> Any:
        request = request_frame(method, args)
        deadline = time.monotonic() + self.timeout_s
        try:
            sock = self._connect(deadline)
            send_all(sock, F.encode(request), deadline)
            reply = F.read_frame(SocketReader(sock, deadline), self.limits)
        except (OSError, F.FrameError) as exc:  # TimeoutError and ConnectionError are OSErrors
            self.close()
            raise TransportError(f"{method} to the server's edge {self.address[0]}:{self.address[1]} failed: {exc}") from exc
        if (reply.method, reply.client_id, reply.kind) != (request.method, request.client_id, request.kind):
            self.close()
            raise TransportError(f"{method}: the edge answered another call ({reply.method.name}, client {reply.client_id}, {reply.kind})")
        if reply.type == F.FrameType.ERROR:
            return reply.error
        if reply.type != F.FrameType.REPLY:
            self.close()
            raise TransportError(f"{method}: the edge answered with a {reply.type.name} frame")
        if request.method == F.Method.EXCHANGE:
            return reply.tensors
        if len(reply.tensors) != 1 or reply.tensors[0].dtype != torch.uint8:
            self.close()
            raise TransportError(f"{method}: the edge's answer is not one uint8 tensor")
        return reply.tensors[0]

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
