"""Per-link encryption of the tensors a client and the server exchange.

Identity key files (``keys``), a mutually authenticated X25519 handshake (``handshake``), an
AES-256-GCM sealed channel (``channel``), their failures (``errors``), and the per-client sessions built on them
(``sessions``) that the server and the client link use.
"""

from __future__ import annotations

from flglm.crypto.channel import KINDS, MessageHeader, SealedChannel, TensorSpec
from flglm.crypto.errors import ChannelError, HandshakeError, MalformedError, OversizeError, RekeyRequired, ReplayError, SessionError, TamperError
from flglm.crypto.handshake import ClientHandshake, SessionKeys, client_finish, client_hello, server_accept
from flglm.crypto.keys import generate_identity, load_identity, load_public_key, public_key_bytes

__all__ = [
    "KINDS",
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
    "TensorSpec",
    "client_finish",
    "client_hello",
    "generate_identity",
    "load_identity",
    "load_public_key",
    "public_key_bytes",
    "server_accept",
]
