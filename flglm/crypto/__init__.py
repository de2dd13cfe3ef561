"""Per-link encryption of the tensors a client and the server exchange.

Pure core, not yet wired into RPC: identity key files (``keys``), a mutually
authenticated X25519 handshake and an AES-256-GCM sealed channel (``channel``).
"""

from __future__ import annotations

from flglm.crypto.channel import (
    ChannelError,
    ClientHandshake,
    HandshakeError,
    MalformedError,
    MessageHeader,
    OversizeError,
    RekeyRequired,
    ReplayError,
    SealedChannel,
    SessionError,
    SessionKeys,
    TamperError,
    client_finish,
    client_hello,
    server_accept,
)
from flglm.crypto.keys import generate_identity, load_identity, load_public_key, public_key_bytes

__all__ = [
    "ChannelError",
    "ClientHandshake",
    "HandshakeError",
    "MalformedError",
    "MessageHeader",
    "OversizeError",
    "RekeyRequired",
    "ReplayError",
    "SealedChannel",
    "SessionError",
    "SessionKeys",
    "TamperError",
    "client_finish",
    "client_hello",
    "generate_identity",
    "load_identity",
    "load_public_key",
    "public_key_bytes",
    "server_accept",
]
