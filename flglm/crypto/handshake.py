"""The mutually authenticated handshake that gives a client and the server their session keys.

Handshake (two messages, Noise-KK-like; both static keys are known in advance):

* hello  = ``b"FLH1"`` || client static public (32) || client ephemeral public (32)
* reply  = ``b"FLR1"`` || server ephemeral public (32) || AES-GCM(confirm key, zero nonce, "flglm v1 server confirm",
  aad = hello || server ephemeral public)

Both sides compute ee, es, se, ss and feed them with the four public keys to HKDF-SHA256 (info
``"flglm v1 session"``), giving a client->server key, a server->client key, a 16-byte session id and a
confirmation key. Only the pinned server (holding its static private key) can produce the confirmation, and
only the allowed client (holding its static private key) can derive the channel keys, so the first sealed
message proves the client.

"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flglm.crypto.channel import DEFAULT_REKEY_EVERY, SESSION_ID_BYTES, SealedChannel
from flglm.crypto.chunks import TAG_BYTES
from flglm.crypto.errors import HandshakeError
from flglm.crypto.keys import KEY_BYTES, public_key_bytes

_HELLO_MAGIC = b"FLH1"
_REPLY_MAGIC = b"FLR1"
_SESSION_INFO = b"flglm v1 session"
_CONFIRM_PLAINTEXT = b"flglm v1 server confirm"
_CONFIRM_LEN = len(_CONFIRM_PLAINTEXT) + TAG_BYTES


@dataclass(frozen=True)
class SessionKeys:
    """Keys of one client-server session."""

    client_to_server: bytes
    """AES-256-GCM key of messages from the client to the server."""
    server_to_client: bytes
    """AES-256-GCM key of messages from the server to the client."""
    session_id: bytes
    """16 bytes naming the session in every message header."""

    def client_channel(self, *, rekey_every: int = DEFAULT_REKEY_EVERY) -> SealedChannel:
        """The client's end: sends client->server, receives server->client."""
        return SealedChannel(self.client_to_server, self.server_to_client, self.session_id, direction="c2s", rekey_every=rekey_every)

    def server_channel(self, *, rekey_every: int = DEFAULT_REKEY_EVERY) -> SealedChannel:
        """The server's end: sends server->client, receives client->server."""
        return SealedChannel(self.server_to_client, self.client_to_server, self.session_id, direction="s2c", rekey_every=rekey_every)


@dataclass(frozen=True)
class ClientHandshake:
    """What the client keeps between :func:`client_hello` and :func:`client_finish`."""

    static_private: X25519PrivateKey
    ephemeral_private: X25519PrivateKey
    server_static_public: bytes
    hello: bytes


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # low-order point -> all-zero shared secret
        raise HandshakeError(f"invalid public key in handshake: {exc}") from None


def _derive(*, ee: bytes, es: bytes, se: bytes, ss: bytes, c_static: bytes, s_static: bytes, c_eph: bytes, s_eph: bytes) -> tuple[SessionKeys, bytes]:
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=32 + 32 + SESSION_ID_BYTES + 32,
        salt=None,
        info=_SESSION_INFO + c_static + s_static + c_eph + s_eph,
    ).derive(ee + es + se + ss)
    keys = SessionKeys(client_to_server=okm[:32], server_to_client=okm[32:64], session_id=okm[64:80])
    return keys, okm[80:]


def _check_public(name: str, key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise HandshakeError(f"{name} must be {KEY_BYTES} raw bytes, got {key!r}")
    return key


def client_hello(static_private: X25519PrivateKey, server_static_public: bytes) -> tuple[ClientHandshake, bytes]:
    """Start a handshake with the server whose static public key is pinned to ``server_static_public``."""
    _check_public("server_static_public", server_static_public)
    ephemeral = X25519PrivateKey.generate()
    hello = _HELLO_MAGIC + public_key_bytes(static_private) + public_key_bytes(ephemeral)
    state = ClientHandshake(static_private, ephemeral, server_static_public, hello)
    return state, hello


def server_accept(server_static_private: X25519PrivateKey, allowed_client_publics: set[bytes], hello_msg: bytes) -> tuple[SessionKeys, bytes]:
    """Answer a hello from an allowed client; raise :class:`HandshakeError` otherwise."""
    if not isinstance(hello_msg, bytes) or len(hello_msg) != 4 + 2 * KEY_BYTES or hello_msg[:4] != _HELLO_MAGIC:
        raise HandshakeError(f"malformed hello ({len(hello_msg)} bytes, expected {4 + 2 * KEY_BYTES} starting {_HELLO_MAGIC!r})")
    c_static = hello_msg[4 : 4 + KEY_BYTES]
    c_eph = hello_msg[4 + KEY_BYTES :]
    if c_static not in allowed_client_publics:
        raise HandshakeError(f"client key not allowed: {c_static.hex()}")
    ephemeral = X25519PrivateKey.generate()
    s_eph = public_key_bytes(ephemeral)
    keys, confirm_key = _derive(
        ee=_dh(ephemeral, c_eph),
        es=_dh(server_static_private, c_eph),
        se=_dh(ephemeral, c_static),
        ss=_dh(server_static_private, c_static),
        c_static=c_static,
        s_static=public_key_bytes(server_static_private),
        c_eph=c_eph,
        s_eph=s_eph,
    )
    confirm = AESGCM(confirm_key).encrypt(bytes(12), _CONFIRM_PLAINTEXT, hello_msg + s_eph)
    return keys, _REPLY_MAGIC + s_eph + confirm


def client_finish(state: ClientHandshake, reply_msg: bytes) -> SessionKeys:
    """Check the server's reply against the pinned key and return the session keys."""
    if not isinstance(reply_msg, bytes) or len(reply_msg) != 4 + KEY_BYTES + _CONFIRM_LEN or reply_msg[:4] != _REPLY_MAGIC:
        raise HandshakeError(f"malformed handshake reply ({len(reply_msg)} bytes, expected {4 + KEY_BYTES + _CONFIRM_LEN})")
    s_eph = reply_msg[4 : 4 + KEY_BYTES]
    confirm = reply_msg[4 + KEY_BYTES :]
    c_static_pub = state.hello[4 : 4 + KEY_BYTES]
    keys, confirm_key = _derive(
        ee=_dh(state.ephemeral_private, s_eph),
        es=_dh(state.ephemeral_private, state.server_static_public),
        se=_dh(state.static_private, s_eph),
        ss=_dh(state.static_private, state.server_static_public),
        c_static=c_static_pub,
        s_static=state.server_static_public,
        c_eph=state.hello[4 + KEY_BYTES :],
        s_eph=s_eph,
    )
    try:
        plain = AESGCM(confirm_key).decrypt(bytes(12), confirm, state.hello + s_eph)
    except InvalidTag:
        raise HandshakeError("server key does not match the pinned key (confirmation failed)") from None
    if plain != _CONFIRM_PLAINTEXT:
        raise HandshakeError("server key does not match the pinned key (unexpected confirmation)")
    return keys
