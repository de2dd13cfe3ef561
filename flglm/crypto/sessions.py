"""Per-client encrypted sessions: the client's end and the server's table of them.

The server knows each client's static public key by client id and refuses any other; a
client pins the server's static public key. A handshake creates a *pending* session on the
server; it becomes the client's active session only when a message sealed under it opens,
which only the holder of the client's private key can produce. A stranger who replays a
client's public key in a hello therefore cannot displace the real client's session.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flglm.crypto.channel import DEFAULT_REKEY_EVERY, MessageHeader, SealedChannel
from flglm.crypto.errors import ChannelError, HandshakeError, SessionError
from flglm.crypto.handshake import ClientHandshake, client_finish, client_hello, server_accept
from flglm.crypto.keys import public_key_bytes


def _as_bytes(message: torch.Tensor, what: str, limit: int = 4096) -> bytes:
    if not isinstance(message, torch.Tensor) or message.dtype != torch.uint8 or message.dim() != 1 or message.numel() > limit:
        raise HandshakeError(f"{what} must be a 1-D torch.uint8 tensor of at most {limit} bytes")
    return message.numpy().tobytes()


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class ClientSession:
    """The client's end of its encrypted link to the server.

    Not thread-safe; the client's calls to the server are sequential.
    """

    def __init__(
        self,
        client_id: int,
        identity: X25519PrivateKey,
        server_public: bytes,
        *,
        rekey_every: int = DEFAULT_REKEY_EVERY,
        max_message_bytes: int,
        pin_memory: bool = False,
    ) -> None:
        self.client_id = client_id
        self.pin_memory = pin_memory
        """Seal and open in pinned host memory: the client computes on a GPU."""
        self._identity = identity
        self._server_public = server_public
        self._rekey_every = rekey_every
        self.max_message_bytes = max_message_bytes
        self._pending: ClientHandshake | None = None
        self._channel: SealedChannel | None = None
        self.handshakes = 0

    @property
    def connected(self) -> bool:
        return self._channel is not None

    @property
    def public_key(self) -> bytes:
        return public_key_bytes(self._identity)

    def hello(self) -> torch.Tensor:
        """Start a (new) handshake; the current channel, if any, stays usable until :meth:`finish`."""
        self._pending, hello = client_hello(self._identity, self._server_public)
        return _as_tensor(hello)

    def finish(self, reply: torch.Tensor) -> None:
        """Check the server's reply against the pinned key and switch to the new session."""
        if self._pending is None:
            raise HandshakeError("finish() called without a hello()")
        keys = client_finish(self._pending, _as_bytes(reply, "handshake reply"))
        self._pending = None
        self._channel = keys.client_channel(rekey_every=self._rekey_every)
        self.handshakes += 1

    def close(self) -> None:
        self._channel = None
        self._pending = None

    def _require(self) -> SealedChannel:
        if self._channel is None:
            raise ChannelError(f"client {self.client_id} has no encrypted session with the server (handshake first)")
        return self._channel

    def seal(self, kind: str, tensors: Sequence[torch.Tensor], *, round: int = 0, step: int = 0) -> torch.Tensor:
        header = MessageHeader(client_id=self.client_id, kind=kind, round=round, step=step)
        return self._require().seal(header, tensors, pin_memory=self.pin_memory)

    def open(self, sealed: torch.Tensor, *, expect_kind: str) -> tuple[MessageHeader, list[torch.Tensor]]:
        header, tensors = self._require().open(sealed, expect_kind=expect_kind, max_bytes=self.max_message_bytes, pin_memory=self.pin_memory)
        if header.client_id != self.client_id:
            raise ChannelError(f"reply addressed to client {header.client_id}, this is client {self.client_id}")
        return header, tensors


@dataclass
class _Slot:
    lock: threading.Lock
    active: SealedChannel | None = None
    pending: SealedChannel | None = None


class ServerSessions:
    """The server's encrypted sessions, one per allowed client id."""

    def __init__(
        self,
        identity: X25519PrivateKey,
        client_keys: dict[int, bytes],
        *,
        rekey_every: int = DEFAULT_REKEY_EVERY,
        max_message_bytes: int,
        pin_memory: bool = False,
    ) -> None:
        self._identity = identity
        self.pin_memory = pin_memory
        """Seal and open in pinned host memory: the server computes on a GPU."""
        self._client_keys = dict(client_keys)
        self._rekey_every = rekey_every
        self.max_message_bytes = max_message_bytes
        self._slots = {cid: _Slot(threading.Lock()) for cid in self._client_keys}
        self.handshakes = 0
        self.rejected = 0

    def _slot(self, client_id: int) -> _Slot:
        slot = self._slots.get(client_id)
        if slot is None:
            raise HandshakeError(f"client {client_id} is not in the server's list of allowed clients {sorted(self._slots)}")
        return slot

    def accept(self, client_id: int, hello: torch.Tensor) -> torch.Tensor:
        """Answer a hello; the new session becomes active at its first valid message."""
        slot = self._slot(client_id)
        try:
            keys, reply = server_accept(self._identity, {self._client_keys[client_id]}, _as_bytes(hello, "hello"))
        except HandshakeError as exc:
            self.rejected += 1
            raise HandshakeError(f"client {client_id}: {exc}") from None
        with slot.lock:
            slot.pending = keys.server_channel(rekey_every=self._rekey_every)
        self.handshakes += 1
        return _as_tensor(reply)

    def open(self, client_id: int, sealed: torch.Tensor, *, expect_kind: str) -> tuple[MessageHeader, list[torch.Tensor]]:
        """Open a message from ``client_id`` under its pending (new) or active session."""
        slot = self._slot(client_id)
        with slot.lock:
            error: ChannelError | None = None
            for name in ("pending", "active"):
                channel: SealedChannel | None = getattr(slot, name)
                if channel is None:
                    continue
                try:
                    header, tensors = channel.open(sealed, expect_kind=expect_kind, max_bytes=self.max_message_bytes, pin_memory=self.pin_memory)
                except ChannelError as exc:
                    error = error or exc
                    continue
                if header.client_id != client_id:
                    # Authentic but mislabelled: cannot happen with a correct client.
                    raise ChannelError(f"message of client {client_id} names client {header.client_id}")
                if name == "pending":
                    slot.active, slot.pending = channel, None
                return header, tensors
            self.rejected += 1
            if error is None:
                raise SessionError(f"client {client_id} has no encrypted session (handshake first)")
            raise type(error)(f"client {client_id}: {error}")

    def seal(self, client_id: int, kind: str, tensors: Sequence[torch.Tensor], *, round: int = 0, step: int = 0) -> torch.Tensor:
        slot = self._slot(client_id)
        with slot.lock:
            if slot.active is None:
                raise SessionError(f"client {client_id} has no active encrypted session")
            header = MessageHeader(client_id=client_id, kind=kind, round=round, step=step)
            return slot.active.seal(header, tensors, pin_memory=self.pin_memory)

    def close(self, client_id: int) -> None:
        slot = self._slot(client_id)
        with slot.lock:
            slot.active = slot.pending = None

    def is_active(self, client_id: int) -> bool:
        slot = self._slots.get(client_id)
        return slot is not None and slot.active is not None
