"""An AES-256-GCM channel for tensors, under the keys a handshake (``flglm.crypto.handshake``) made.

Sealed message = compact header || ciphertext || 16-byte tag; a payload above
:data:`~flglm.crypto.chunks.CHUNK_BYTES` is sealed as several AES-GCM chunks, header ||
(ciphertext || tag) per chunk (layout: :mod:`flglm.crypto.chunks`), sealed and opened on
several threads (:mod:`flglm.crypto.parallel`). The header (version, kind, key epoch,
counter, client id, round, step, and each tensor's dtype and shape; integers as LEB128 varints) is
authenticated as associated data together with the session id and the direction, which are not sent:
a message of another session or a reflected one fails authentication. Nonce = 4-byte direction tag ||
8-byte big-endian counter, the tag's last byte holding the chunk index (so every chunk of every
message has a nonce of its own, and a chunk moved to another place fails its tag); the counter increases by one per message and direction and never restarts
within a session, so a nonce is never reused under a key. After ``rekey_every`` messages or
``rekey_bytes`` payload bytes the sender moves to the next key of its direction (HKDF of the current
one); the header's key epoch tells the receiver to follow, and the receiver checks the limits too. The header costs 16-30 bytes for the tensors of one training step, plus the 16-byte tag.

A :class:`SealedChannel` is not thread-safe: the owner serialises its calls. An end that computes
on a GPU seals and opens with ``pin_memory=True``: messages then live in pinned host memory, which
torch's host allocator caches (a fresh 33.5 MB buffer from the OS costs 8-12 ms of page faults
here, more than the AES-GCM of it), and from which ``.to(device, non_blocking=True)`` copies asynchronously.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flglm.crypto.chunks import MAX_CHUNKS, TAG_BYTES, chunk_layout, sealed_size
from flglm.crypto.errors import MalformedError, OversizeError, RekeyRequired, ReplayError, SessionError, TamperError
from flglm.crypto.parallel import run_all
from flglm.link.protocol import WIRE_KINDS as KINDS

PROTOCOL_VERSION = 2
"""Version byte of every sealed message (2: payloads above :data:`~flglm.crypto.chunks.CHUNK_BYTES` are chunked)."""

SESSION_ID_BYTES = 16
DEFAULT_REKEY_EVERY = 2**20
"""Messages sealed under one key before the sender moves to the next key.

Together with :data:`DEFAULT_REKEY_BYTES` this keeps every key far inside AES-GCM's limits
(RFC 8446 section 5.5) whatever the message sizes. Clients also start a fresh handshake every epoch."""
MAX_REKEY_EVERY = 2**24
DEFAULT_REKEY_BYTES = 2**36
"""Payload bytes sealed under one key before the sender moves to the next (64 GiB).

RFC 8446 section 5.5 allows AES-GCM 2**24.5 full 16 KiB records per key (about 2**38.5 bytes);
our messages are megabytes, so a count of messages alone would not bound the data per key."""

_REKEY_INFO = b"flglm v1 rekey"

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
    "float64": torch.float64,
    "int8": torch.int8,
}
"""Dtype names allowed on the wire (codes by position: a new one goes at the end; int8 carries ``link.wire_dtype=int8``'s values)."""
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

_DTYPE_CODES = {name: i for i, name in enumerate(DTYPES)}

_KIND_CODES = {name: i for i, name in enumerate(KINDS)}

MAX_NDIM = 8
MAX_TENSORS = 16
_MAX_VARINT_BYTES = 10

if sys.byteorder != "little":  # payloads are raw native bytes; both ends must agree
    raise ImportError("flglm.crypto.channel assumes a little-endian host")


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class TensorSpec:
    """dtype name and shape of one tensor in a sealed message."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class MessageHeader:
    """Authenticated (not encrypted) description of one sealed message."""

    client_id: int
    kind: str
    """One of :data:`KINDS`."""
    round: int = 0
    """Aggregation round (aggregation messages), decoding session (generation), or 0."""
    step: int = 0
    """Request id of a forward/backward pair, or the client's step."""
    tensors: tuple[TensorSpec, ...] = ()
    """Filled by :meth:`SealedChannel.seal` from the payload."""
    counter: int = 0
    """Filled by :meth:`SealedChannel.seal`: 1, 2, ... per direction and session."""
    key_epoch: int = 0
    """Filled by :meth:`SealedChannel.seal`: how many times the sender's key has moved on."""
    version: int = PROTOCOL_VERSION

    @property
    def payload_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.tensors)


def _varint(value: int) -> bytes:
    if value < 0:
        raise ValueError(f"header integers must be >= 0, got {value}")
    if value >= 2**64:
        raise ValueError(f"header integers must be < 2**64, got {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _encode_header(h: MessageHeader) -> bytes:
    if h.kind not in _KIND_CODES:
        raise ValueError(f"unknown message kind {h.kind!r}; known: {list(KINDS)}")
    if len(h.tensors) > MAX_TENSORS:
        raise ValueError(f"{len(h.tensors)} tensors in one message, at most {MAX_TENSORS} allowed")
    parts = [bytes([h.version, _KIND_CODES[h.kind]])]
    parts += [_varint(v) for v in (h.key_epoch, h.counter, h.client_id, h.round, h.step)]
    parts.append(bytes([len(h.tensors)]))
    for spec in h.tensors:
        if len(spec.shape) > MAX_NDIM:
            raise ValueError(f"shape {spec.shape} has more than {MAX_NDIM} dimensions")
        parts.append(bytes([_DTYPE_CODES[spec.dtype], len(spec.shape)]))
        parts += [_varint(d) for d in spec.shape]
    return b"".join(parts)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self._data):
            raise MalformedError(f"message truncated inside its header ({len(self._data)} bytes)")
        value = self._data[self.pos]
        self.pos += 1
        return value

    def varint(self) -> int:
        value = 0
        for i in range(_MAX_VARINT_BYTES):
            byte = self.byte()
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if value >= 2**64:
                    break
                return value
        raise MalformedError("header integer is longer than 64 bits")


def _decode_header(data: bytes) -> tuple[MessageHeader, int]:
    """Parse a header; return it and its encoded length. Only structure is checked here."""
    r = _Reader(data)
    version = r.byte()
    if version != PROTOCOL_VERSION:
        raise SessionError(f"protocol version {version} not supported (expected {PROTOCOL_VERSION})")
    kind_code = r.byte()
    if kind_code >= len(KINDS):
        raise MalformedError(f"unknown message kind code {kind_code}")
    key_epoch, counter, client_id, round_, step = (r.varint() for _ in range(5))
    count = r.byte()
    if count > MAX_TENSORS:
        raise MalformedError(f"message announces {count} tensors, at most {MAX_TENSORS} allowed")
    specs = []
    for _ in range(count):
        dtype_code, ndim = r.byte(), r.byte()
        if dtype_code >= len(DTYPES):
            raise MalformedError(f"unknown dtype code {dtype_code}; allowed: {sorted(DTYPES)}")
        if ndim > MAX_NDIM:
            raise MalformedError(f"tensor announces {ndim} dimensions, at most {MAX_NDIM} allowed")
        specs.append(TensorSpec(list(DTYPES)[dtype_code], tuple(r.varint() for _ in range(ndim))))
    header = MessageHeader(
        client_id=client_id,
        kind=KINDS[kind_code],
        round=round_,
        step=step,
        tensors=tuple(specs),
        counter=counter,
        key_epoch=key_epoch,
        version=version,
    )
    return header, r.pos


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor on the host (a view when it is already there, contiguous)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _plaintext(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(tensors) == 1:
        return _flat_bytes(tensors[0])
    if not tensors:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.cat([_flat_bytes(t) for t in tensors])


_MAX_HEADER_BYTES = 2 + 5 * _MAX_VARINT_BYTES + 1 + MAX_TENSORS * (2 + MAX_NDIM * _MAX_VARINT_BYTES)
"""Longest header a sender can produce; only this many leading bytes are parsed as a header."""


def _next_key(key: bytes, session_id: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=session_id, info=_REKEY_INFO).derive(key)


class _Direction:
    """Key, epoch and counter of one direction of a channel."""

    def __init__(self, key: bytes, name: str, session_id: bytes) -> None:
        self.key = key
        self.aead = AESGCM(key)
        self.epoch = 0
        self.counter = 0
        self.messages_in_key = 0
        self.bytes_in_key = 0
        self.byte, self.tag = _DIRECTIONS[name]
        self.session_id = session_id

    def advanced(self) -> tuple[bytes, AESGCM]:
        key = _next_key(self.key, self.session_id)
        return key, AESGCM(key)

    def must_advance(self, payload_bytes: int, rekey_every: int, rekey_bytes: int) -> bool:
        """Whether the next message of ``payload_bytes`` goes under the next key."""
        return self.messages_in_key >= rekey_every or (self.messages_in_key > 0 and self.bytes_in_key + payload_bytes > rekey_bytes)

    def commit(self, key: bytes, aead: AESGCM, epoch: int, counter: int, payload_bytes: int) -> None:
        if epoch != self.epoch:
            self.messages_in_key = self.bytes_in_key = 0
        self.key, self.aead, self.epoch, self.counter = key, aead, epoch, counter
        self.messages_in_key += 1
        self.bytes_in_key += payload_bytes

    def nonce(self, counter: int, chunk: int = 0) -> bytes:
        return self.tag[:3] + bytes([chunk]) + counter.to_bytes(8, "big")

    def aad(self, header_bytes: bytes) -> bytes:
        return self.session_id + bytes([self.byte]) + header_bytes


class SealedChannel:
    """One end of an encrypted link: seals outgoing tensors, opens incoming ones.

    ``direction`` is this end's sending direction: ``"c2s"`` on the client, ``"s2c"`` on the server.
    A message carries up to :data:`MAX_TENSORS` tensors, so one call of the protocol is one
    message and is accepted or rejected as a whole.
    """

    def __init__(
        self,
        send_key: bytes,
        recv_key: bytes,
        session_id: bytes,
        *,
        direction: str,
        rekey_every: int = DEFAULT_REKEY_EVERY,
        rekey_bytes: int = DEFAULT_REKEY_BYTES,
    ) -> None:
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be 'c2s' or 's2c', got {direction!r}")
        for name, key in (("send_key", send_key), ("recv_key", recv_key)):
            if not isinstance(key, bytes) or len(key) != 32:
                raise ValueError(f"{name} must be 32 bytes, got {len(key) if isinstance(key, bytes) else key!r}")
        if not isinstance(session_id, bytes) or len(session_id) != SESSION_ID_BYTES:
            raise ValueError(f"session_id must be {SESSION_ID_BYTES} bytes, got {session_id!r}")
        if not 1 <= rekey_every <= MAX_REKEY_EVERY:
            raise ValueError(f"rekey_every must be in [1, {MAX_REKEY_EVERY}], got {rekey_every}")
        self._session_id = session_id
        self._send = _Direction(send_key, direction, session_id)
        self._recv = _Direction(recv_key, _OTHER[direction], session_id)
        if rekey_bytes < 1:
            raise ValueError(f"rekey_bytes must be >= 1, got {rekey_bytes}")
        self._rekey_every = rekey_every
        self._rekey_bytes = rekey_bytes

    @property
    def session_id(self) -> bytes:
        return self._session_id

    @property
    def sent(self) -> int:
        return self._send.counter

    @property
    def received(self) -> int:
        return self._recv.counter

    @property
    def send_epoch(self) -> int:
        return self._send.epoch

    def seal(self, header: MessageHeader, tensors: Sequence[torch.Tensor], *, pin_memory: bool = False) -> torch.Tensor:
        """Encrypt ``tensors``; return a ``uint8`` tensor = header || (ciphertext || tag) per chunk.

        ``pin_memory``: seal into pinned host memory (this end computes on a GPU)."""
        for t in tensors:
            if t.dtype not in _DTYPE_NAMES:
                raise ValueError(f"dtype {t.dtype} cannot be sealed; allowed: {sorted(DTYPES)}")
        send = self._send
        if send.counter + 1 >= 2**63:
            raise RekeyRequired("this session has sealed 2**63 messages; start a new handshake")
        counter = send.counter + 1
        plaintext = _plaintext(tensors)
        nbytes = plaintext.numel()
        epoch, key, aead = send.epoch, send.key, send.aead
        if send.must_advance(nbytes, self._rekey_every, self._rekey_bytes):
            epoch += 1
            key, aead = send.advanced()
        header = dataclasses.replace(
            header,
            tensors=tuple(TensorSpec(_DTYPE_NAMES[t.dtype], tuple(t.shape)) for t in tensors),
            counter=counter,
            key_epoch=epoch,
            version=PROTOCOL_VERSION,
        )
        header_bytes = _encode_header(header)
        aad = send.aad(header_bytes)
        # Sealed straight into a torch-owned buffer: RPC sends torch-allocated tensors without
        # pickling them (a tensor over a Python bytearray was measured ~10x slower to send).
        out = torch.empty(sealed_size(len(header_bytes), nbytes), dtype=torch.uint8, pin_memory=pin_memory)
        out[: len(header_bytes)] = torch.frombuffer(bytearray(header_bytes), dtype=torch.uint8)
        source, sink, layout = plaintext.numpy(), out.numpy(), chunk_layout(len(header_bytes), nbytes)

        def seal_chunk(index: int) -> None:
            plain, sealed = layout[index]
            aead.encrypt_into(send.nonce(counter, index), source[plain], aad, sink[sealed])

        run_all([functools.partial(seal_chunk, i) for i in range(len(layout))])
        send.commit(key, aead, epoch, counter, nbytes)
        return out

    def open(self, sealed: torch.Tensor, *, expect_kind: str, max_bytes: int, pin_memory: bool = False) -> tuple[MessageHeader, list[torch.Tensor]]:
        """Check and decrypt one message. A rejected message leaves the channel unchanged.

        Sizes are checked against ``max_bytes`` before anything is decrypted or allocated.
        ``pin_memory``: decrypt into pinned host memory (the receiver computes on a GPU).
        """
        if not isinstance(sealed, torch.Tensor) or sealed.dtype != torch.uint8 or sealed.dim() != 1:
            raise MalformedError("a sealed message must be a 1-D torch.uint8 tensor")
        if sealed.numel() > max_bytes + _MAX_HEADER_BYTES + TAG_BYTES * MAX_CHUNKS:
            raise OversizeError(f"sealed message of {sealed.numel()} bytes exceeds the limit of {max_bytes} payload bytes")
        data = sealed.contiguous().numpy()
        header, header_len = _decode_header(data[:_MAX_HEADER_BYTES].tobytes())
        recv = self._recv
        expected = recv.counter + 1
        if header.counter != expected:
            problem = "replayed" if header.counter <= recv.counter else "out of order (messages missing)"
            raise ReplayError(f"message counter {header.counter} is {problem}; expected {expected}")
        nbytes = header.payload_bytes
        due = recv.must_advance(nbytes, self._rekey_every, self._rekey_bytes)
        if header.key_epoch != recv.epoch + due:
            # The sender must move to the next key exactly when the limits say so, never skip one.
            raise SessionError(f"message {header.counter} claims key epoch {header.key_epoch}, expected {recv.epoch + due}")
        epoch = header.key_epoch
        if nbytes > max_bytes:
            shapes = ", ".join(f"{s.dtype}{list(s.shape)}" for s in header.tensors)
            raise OversizeError(f"payload ({shapes}) is {nbytes} bytes, limit {max_bytes}")
        expected_bytes = sealed_size(header_len, nbytes)
        if len(data) != expected_bytes:
            raise MalformedError(f"ciphertext is {len(data) - header_len} bytes, expected {expected_bytes - header_len} for the announced tensors")
        key, aead = recv.key, recv.aead
        if epoch != recv.epoch:
            key, aead = recv.advanced()
        plaintext = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin_memory)
        sink, aad, layout = plaintext.numpy(), recv.aad(data[:header_len].tobytes()), chunk_layout(header_len, nbytes)

        def open_chunk(index: int) -> None:
            plain, sealed = layout[index]
            aead.decrypt_into(recv.nonce(header.counter, index), data[sealed], aad, sink[plain])

        try:
            run_all([functools.partial(open_chunk, i) for i in range(len(layout))])
        except InvalidTag:
            raise TamperError(
                f"message {header.counter} failed authentication (modified, of another session or direction, or under another key)"
            ) from None
        if header.kind != expect_kind:
            raise MalformedError(f"expected a {expect_kind!r} message, got {header.kind!r}")
        tensors = []
        offset = 0
        for spec in header.tensors:
            dtype = DTYPES[spec.dtype]
            chunk = plaintext[offset : offset + spec.nbytes]
            if offset % dtype.itemsize:  # a view must be aligned to its element size
                chunk = chunk.clone()
            tensors.append(chunk.view(dtype).reshape(spec.shape))
            offset += spec.nbytes
        recv.commit(key, aead, epoch, header.counter, nbytes)
        return header, tensors
