"""Mutually authenticated handshake and an AES-256-GCM channel for tensors.

Handshake (two messages, Noise-KK-like; both static keys are known in advance):

* hello  = ``b"FLH1"`` || client static public (32) || client ephemeral public (32)
* reply  = ``b"FLR1"`` || server ephemeral public (32) || AES-GCM(confirm key, zero nonce, "flglm v1 server confirm",
  aad = hello || server ephemeral public)

Both sides compute ee, es, se, ss and feed them with the four public keys to HKDF-SHA256 (info
``"flglm v1 session"``), giving a client->server key, a server->client key, a 16-byte session id and a
confirmation key. Only the pinned server (holding its static private key) can produce the confirmation, and
only the allowed client (holding its static private key) can derive the channel keys, so the first sealed
message proves the client.

Sealed message = encoded :class:`MessageHeader` (the AEAD associated data) || ciphertext || 16-byte tag, with
nonce = 4-byte direction tag || 8-byte big-endian counter. A :class:`SealedChannel` is not thread-safe.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import sys
from dataclasses import dataclass

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flglm.crypto.keys import KEY_BYTES, public_key_bytes

PROTOCOL_VERSION = 1
"""Version byte of every sealed message."""

SESSION_ID_BYTES = 16
TAG_BYTES = 16
DEFAULT_MAX_MESSAGES = 2**24
"""Messages sealed under one key before :meth:`SealedChannel.rekey` is required (RFC 8446 section 5.5 style)."""

_HELLO_MAGIC = b"FLH1"
_REPLY_MAGIC = b"FLR1"
_MSG_MAGIC = b"FLS1"
_SESSION_INFO = b"flglm v1 session"
_REKEY_INFO = b"flglm v1 rekey"
_CONFIRM_PLAINTEXT = b"flglm v1 server confirm"
_CONFIRM_LEN = len(_CONFIRM_PLAINTEXT) + TAG_BYTES

_DIRECTIONS: dict[str, tuple[int, bytes]] = {"c2s": (0, b"C2S\x00"), "s2c": (1, b"S2C\x00")}
"""Direction name -> (header byte, nonce tag)."""
_OTHER = {"c2s": "s2c", "s2c": "c2s"}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
    "uint8": torch.uint8,
}
"""Dtype names allowed on the wire."""
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

MAX_NDIM = 32
MAX_KIND_BYTES = 32

# magic, version, direction, session id, counter, round, step
_FIXED = struct.Struct(">4sBB16sQQQ")

if sys.byteorder != "little":  # payloads are raw native bytes; both ends must agree
    raise ImportError("flglm.crypto.channel assumes a little-endian host")


class ChannelError(ValueError):
    """Base class of every handshake or channel failure."""


class HandshakeError(ChannelError):
    """The handshake failed (unknown client, wrong server, malformed message)."""


class MalformedError(ChannelError):
    """A sealed message cannot be parsed or its sizes are inconsistent."""


class SessionError(ChannelError):
    """A message belongs to another session, version or direction."""


class ReplayError(ChannelError):
    """A message was replayed, reordered or dropped (counter is not last received + 1)."""


class TamperError(ChannelError):
    """Authentication failed: the header or ciphertext was modified, or the key is wrong."""


class OversizeError(ChannelError):
    """The announced payload is larger than the receiver accepts."""


class RekeyRequired(ChannelError):
    """The per-key message limit is reached; call :meth:`SealedChannel.rekey` on both sides."""


# ---------------------------------------------------------------- handshake


@dataclass(frozen=True)
class SessionKeys:
    """Keys of one client-server session."""

    client_to_server: bytes
    """AES-256-GCM key of messages from the client to the server."""
    server_to_client: bytes
    """AES-256-GCM key of messages from the server to the client."""
    session_id: bytes
    """16 bytes naming the session in every message header."""

    def client_channel(self, **kwargs: int) -> SealedChannel:
        """The client's end: sends client->server, receives server->client."""
        return SealedChannel(self.client_to_server, self.server_to_client, self.session_id, direction="c2s", **kwargs)

    def server_channel(self, **kwargs: int) -> SealedChannel:
        """The server's end: sends server->client, receives client->server."""
        return SealedChannel(self.server_to_client, self.client_to_server, self.session_id, direction="s2c", **kwargs)


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


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class MessageHeader:
    """Authenticated (not encrypted) description of one sealed tensor."""

    client_id: str
    round: int
    step: int
    kind: str
    """Short ASCII label, e.g. ``"hidden"`` or ``"grad"``."""
    dtype: str = ""
    """Filled by :meth:`SealedChannel.seal` from the payload; one of :data:`DTYPES`."""
    shape: tuple[int, ...] = ()
    """Filled by :meth:`SealedChannel.seal` from the payload."""
    counter: int = 0
    """Filled by :meth:`SealedChannel.seal`: 1, 2, ... per direction and key."""
    session: bytes = b""
    """Filled by :meth:`SealedChannel.seal`."""
    version: int = PROTOCOL_VERSION


def _encode_header(h: MessageHeader, direction_byte: int) -> bytes:
    client_id = h.client_id.encode("utf-8")
    kind = h.kind.encode("ascii")
    dtype = h.dtype.encode("ascii")
    if len(client_id) > 0xFFFF:
        raise ValueError(f"client_id is {len(client_id)} bytes, at most 65535 allowed")
    if not 0 < len(kind) <= MAX_KIND_BYTES:
        raise ValueError(f"kind {h.kind!r} must be 1..{MAX_KIND_BYTES} ASCII characters")
    if len(h.shape) > MAX_NDIM:
        raise ValueError(f"shape {h.shape} has more than {MAX_NDIM} dimensions")
    for name, value in (("round", h.round), ("step", h.step), ("counter", h.counter)):
        if not 0 <= value < 2**64:
            raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return b"".join(
        [
            _FIXED.pack(_MSG_MAGIC, h.version, direction_byte, h.session, h.counter, h.round, h.step),
            struct.pack(">H", len(client_id)),
            client_id,
            struct.pack(">B", len(kind)),
            kind,
            struct.pack(">B", len(dtype)),
            dtype,
            struct.pack(">B", len(h.shape)),
            struct.pack(f">{len(h.shape)}Q", *h.shape),
        ]
    )


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self._data):
            raise MalformedError(f"message truncated: needs {self.pos + n} bytes, has {len(self._data)}")
        out = self._data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size))


def _decode_header(data: bytes) -> tuple[MessageHeader, int, int]:
    """Parse a header; return it, its direction byte and its encoded length."""
    r = _Reader(data)
    magic, version, direction_byte, session, counter, round_, step = r.unpack(_FIXED.format)
    if magic != _MSG_MAGIC:
        raise MalformedError(f"not a sealed message (magic {magic!r}, expected {_MSG_MAGIC!r})")
    try:
        (n,) = r.unpack(">H")
        client_id = r.take(n).decode("utf-8")
        (n,) = r.unpack(">B")
        kind = r.take(n).decode("ascii")
        (n,) = r.unpack(">B")
        dtype = r.take(n).decode("ascii")
    except UnicodeDecodeError as exc:
        raise MalformedError(f"header text field is not valid text: {exc}") from None
    (ndim,) = r.unpack(">B")
    if ndim > MAX_NDIM:
        raise MalformedError(f"header announces {ndim} dimensions, at most {MAX_NDIM} allowed")
    shape = r.unpack(f">{ndim}Q")
    header = MessageHeader(
        client_id=client_id,
        round=round_,
        step=step,
        kind=kind,
        dtype=dtype,
        shape=tuple(shape),
        counter=counter,
        session=session,
        version=version,
    )
    return header, direction_byte, r.pos


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


class SealedChannel:
    """One end of an encrypted link: seals outgoing tensors, opens incoming ones.

    ``direction`` is this end's sending direction: ``"c2s"`` on the client, ``"s2c"`` on the server.
    """

    def __init__(
        self,
        send_key: bytes,
        recv_key: bytes,
        session_id: bytes,
        *,
        direction: str,
        max_messages: int = DEFAULT_MAX_MESSAGES,
    ) -> None:
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be 'c2s' or 's2c', got {direction!r}")
        for name, key in (("send_key", send_key), ("recv_key", recv_key)):
            if not isinstance(key, bytes) or len(key) != 32:
                raise ValueError(f"{name} must be 32 bytes, got {len(key) if isinstance(key, bytes) else key!r}")
        if not isinstance(session_id, bytes) or len(session_id) != SESSION_ID_BYTES:
            raise ValueError(f"session_id must be {SESSION_ID_BYTES} bytes, got {session_id!r}")
        if not 1 <= max_messages < 2**64:
            raise ValueError(f"max_messages must be in [1, 2**64), got {max_messages}")
        self._send_key = send_key
        self._recv_key = recv_key
        self._send_aead = AESGCM(send_key)
        self._recv_aead = AESGCM(recv_key)
        self._session_id = session_id
        self._send_dir, self._send_tag = _DIRECTIONS[direction]
        self._recv_dir, self._recv_tag = _DIRECTIONS[_OTHER[direction]]
        self._max_messages = max_messages
        self._sent = 0
        self._received = 0

    @property
    def session_id(self) -> bytes:
        return self._session_id

    def seal(self, header: MessageHeader, payload: torch.Tensor) -> torch.Tensor:
        """Encrypt ``payload``; return ``uint8`` tensor = encoded header || ciphertext || tag."""
        if payload.dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype {payload.dtype} cannot be sealed; allowed: {sorted(DTYPES)}")
        if self._sent >= self._max_messages:
            raise RekeyRequired(f"{self._sent} messages sealed under this key (limit {self._max_messages}); call rekey()")
        counter = self._sent + 1
        header = dataclasses.replace(
            header,
            dtype=_DTYPE_NAMES[payload.dtype],
            shape=tuple(payload.shape),
            counter=counter,
            session=self._session_id,
            version=PROTOCOL_VERSION,
        )
        aad = _encode_header(header, self._send_dir)
        ciphertext = self._send_aead.encrypt(self._send_tag + counter.to_bytes(8, "big"), _tensor_bytes(payload), aad)
        self._sent = counter
        return torch.frombuffer(bytearray(aad + ciphertext), dtype=torch.uint8)

    def open(self, sealed: torch.Tensor, *, expect_kind: str | None = None, max_bytes: int) -> tuple[MessageHeader, torch.Tensor]:
        """Check and decrypt one message. A rejected message leaves the channel unchanged."""
        if not isinstance(sealed, torch.Tensor) or sealed.dtype != torch.uint8 or sealed.dim() != 1:
            raise MalformedError("a sealed message must be a 1-D torch.uint8 tensor")
        data = _tensor_bytes(sealed)
        header, direction_byte, header_len = _decode_header(data)
        if header.version != PROTOCOL_VERSION:
            raise SessionError(f"protocol version {header.version} not supported (expected {PROTOCOL_VERSION})")
        if header.session != self._session_id:
            raise SessionError(f"message is from session {header.session.hex()}, not {self._session_id.hex()}")
        if direction_byte != self._recv_dir:
            raise SessionError(f"message direction byte {direction_byte}, expected {self._recv_dir} (reflected message?)")
        expected = self._received + 1
        if header.counter != expected:
            kind = "replayed" if header.counter <= self._received else "out of order (messages missing)"
            raise ReplayError(f"message counter {header.counter} is {kind}; expected {expected}")
        if header.counter > self._max_messages:
            raise RekeyRequired(f"message counter {header.counter} exceeds the per-key limit {self._max_messages}")
        dtype = DTYPES.get(header.dtype)
        if dtype is None:
            raise MalformedError(f"dtype {header.dtype!r} not allowed; allowed: {sorted(DTYPES)}")
        numel = math.prod(header.shape)
        nbytes = numel * dtype.itemsize
        if nbytes > max_bytes:
            raise OversizeError(f"payload of shape {header.shape} {header.dtype} is {nbytes} bytes, limit {max_bytes}")
        ciphertext = data[header_len:]
        if len(ciphertext) != nbytes + TAG_BYTES:
            raise MalformedError(f"ciphertext is {len(ciphertext)} bytes, expected {nbytes + TAG_BYTES} for shape {header.shape} {header.dtype}")
        try:
            plaintext = self._recv_aead.decrypt(self._recv_tag + header.counter.to_bytes(8, "big"), ciphertext, data[:header_len])
        except InvalidTag:
            raise TamperError(f"message {header.counter} failed authentication (modified, or sealed under another key)") from None
        if expect_kind is not None and header.kind != expect_kind:
            raise MalformedError(f"expected a {expect_kind!r} message, got {header.kind!r}")
        if numel == 0:
            tensor = torch.empty(header.shape, dtype=dtype)
        else:
            tensor = torch.frombuffer(bytearray(plaintext), dtype=dtype).reshape(header.shape)
        self._received = header.counter
        return header, tensor

    def rekey(self) -> None:
        """Move both directions to the next keys (HKDF of the current ones) and reset the counters.

        Both ends must call it at the same point of the message stream.
        """
        self._send_key = _next_key(self._send_key, self._session_id)
        self._recv_key = _next_key(self._recv_key, self._session_id)
        self._send_aead = AESGCM(self._send_key)
        self._recv_aead = AESGCM(self._recv_key)
        self._sent = 0
        self._received = 0


def _next_key(key: bytes, session_id: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=session_id, info=_REKEY_INFO).derive(key)
