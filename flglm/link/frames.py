"""The socket link's wire format: length-prefixed frames of one fixed, versioned layout.

A frame is a 40-byte prefix, then per tensor an 80-byte descriptor, then the tensors' raw
bytes (or, in an error frame, an error code and a bounded UTF-8 message)::

    prefix      magic "FLGF", version, frame type, method code, kind code, client id (u32),
                round (u64), step (u64), body length (u64), tensor count (u16), 2 zero bytes
    descriptor  dtype code (u8), ndim (u8), 6 zero bytes, 8 dims (u64), byte length (u64)
    error body  error code (u8), message length (u16), message

Everything is little-endian. The receiver checks every size against :class:`FrameLimits`
before it allocates anything, never unpickles, and looks nothing up by a name the peer
chose: methods, kinds, dtypes and error classes travel as codes of fixed tables. The method
table has exactly the endpoint's three calls; there is no frame for anything else.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

import torch

from flglm.crypto.errors import ChannelError, HandshakeError, MalformedError, OversizeError, RekeyRequired, ReplayError, SessionError, TamperError
from flglm.link.messages import InvalidMessageError
from flglm.link.protocol import KINDS

MAGIC = b"FLGF"
VERSION = 1
PREFIX = struct.Struct("<4sBBBBIQQQH2x")
DESCRIPTOR = struct.Struct("<BB6x8QQ")
ERROR_HEAD = struct.Struct("<BH")
MAX_NDIM = 8
MAX_TENSORS = 16
MAX_ERROR_MESSAGE = 2048
"""Bytes of an error message; longer ones are cut."""
HANDSHAKE_FRAME_BYTES = 4096
"""Largest frame a connection may send before its handshake (a hello is 68 bytes)."""


class FrameError(InvalidMessageError):
    """A frame violates the wire format; nothing was allocated past the limits, the connection is closed."""


class FrameType(IntEnum):
    REQUEST = 1
    REPLY = 2
    ERROR = 3


class Method(IntEnum):
    """The endpoint's three calls (``flglm.link.rpc_entries.ENTRY_NAMES``), and nothing else."""

    HANDSHAKE = 1
    EXCHANGE = 2
    SEALED = 3


METHOD_OF_NAME = {"handshake": Method.HANDSHAKE, "exchange": Method.EXCHANGE, "sealed": Method.SEALED}

DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool, torch.int8,
)  # fmt: skip
"""Dtypes allowed on the wire; code = index + 1 (a new one goes at the end: int8 carries ``link.wire_dtype=int8``'s values)."""
_DTYPE_CODE = {dtype: i + 1 for i, dtype in enumerate(DTYPES)}

ERRORS: tuple[type[Exception], ...] = (
    InvalidMessageError, FrameError, ChannelError, HandshakeError, MalformedError, SessionError, ReplayError,
    TamperError, OversizeError, RekeyRequired, TimeoutError, RuntimeError, ValueError,
)  # fmt: skip
"""Exception classes an error frame can name; code = index + 1. Any other becomes a RuntimeError."""
_ERROR_CODE = {cls: i + 1 for i, cls in enumerate(ERRORS)}


@dataclass(frozen=True)
class FrameLimits:
    """What a receiver accepts; checked before anything is allocated."""

    max_frame_bytes: int
    max_tensors: int = MAX_TENSORS


@dataclass
class Frame:
    """One decoded frame. ``kind`` is None for a handshake; ``error`` is set in an error frame."""

    type: FrameType
    method: Method
    client_id: int
    kind: str | None = None
    round: int = 0
    step: int = 0
    tensors: list[torch.Tensor] = field(default_factory=list)
    error: Exception | None = None


# ---------------------------------------------------------------- encoding


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _check_u(value: int, bits: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**bits:
        raise FrameError(f"{what} must be an integer in [0, 2**{bits}), got {value!r}")
    return value


def encode(frame: Frame) -> list[memoryview | bytes]:
    """The frame as buffers to send in order (header bytes, then each tensor's own memory: no copy)."""
    kind_code = 0 if frame.kind is None else KINDS.index(frame.kind) + 1
    if frame.type == FrameType.ERROR:
        assert frame.error is not None
        cls = next((c for c in type(frame.error).__mro__ if c in _ERROR_CODE), RuntimeError)
        code = _ERROR_CODE[cls]
        text = str(frame.error) if type(frame.error) is cls else f"{type(frame.error).__name__}: {frame.error}"
        message = text.encode("utf-8")[:MAX_ERROR_MESSAGE]
        body = ERROR_HEAD.pack(code, len(message)) + message
        prefix = PREFIX.pack(MAGIC, VERSION, frame.type, frame.method, kind_code, frame.client_id, frame.round, frame.step, len(body), 0)
        return [prefix + body]
    if len(frame.tensors) > MAX_TENSORS:
        raise FrameError(f"a frame carries at most {MAX_TENSORS} tensors, got {len(frame.tensors)}")
    heads: list[bytes] = []
    data: list[memoryview] = []
    for tensor in frame.tensors:
        if tensor.dtype not in _DTYPE_CODE or tensor.dim() > MAX_NDIM:
            raise FrameError(f"a {tensor.dtype} tensor of {tensor.dim()} dims cannot cross (dtypes {DTYPES}, at most {MAX_NDIM} dims)")
        raw = _tensor_bytes(tensor)
        dims = [*tensor.shape, *([0] * (MAX_NDIM - tensor.dim()))]
        heads.append(DESCRIPTOR.pack(_DTYPE_CODE[tensor.dtype], tensor.dim(), *dims, raw.nbytes))
        data.append(raw)
    body_length = len(heads) * DESCRIPTOR.size + sum(d.nbytes for d in data)
    _check_u(frame.client_id, 32, "client id")
    _check_u(frame.round, 63, "round")
    _check_u(frame.step, 63, "step")
    prefix = PREFIX.pack(MAGIC, VERSION, frame.type, frame.method, kind_code, frame.client_id, frame.round, frame.step, body_length, len(heads))
    return [prefix + b"".join(heads), *(d for d in data if d.nbytes)]


# ---------------------------------------------------------------- decoding

ReadInto = Callable[[memoryview], None]
"""Fills the whole view from the peer, or raises (EOF, timeout, reset)."""
Allocate = Callable[[int], torch.Tensor]


def _allocate(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


@dataclass(frozen=True)
class Prefix:
    type: FrameType
    method: Method
    client_id: int
    kind: str | None
    round: int
    step: int
    body_length: int
    tensor_count: int


def read_prefix(read_into: ReadInto, limits: FrameLimits) -> Prefix:
    """Read and check a frame's fixed prefix (the body's length against ``limits`` included)."""
    raw = bytearray(PREFIX.size)
    read_into(memoryview(raw))
    magic, version, ftype, method, kind, client_id, round_, step, body_length, count = PREFIX.unpack(raw)
    if magic != MAGIC:
        raise FrameError(f"not a flglm frame (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise FrameError(f"frame version {version} is not supported (this side speaks {VERSION})")
    if ftype not in FrameType._value2member_map_:
        raise FrameError(f"unknown frame type {ftype}")
    if method not in Method._value2member_map_:
        raise FrameError(f"unknown method code {method}; the link has only {[m.value for m in Method]}")
    if kind > len(KINDS):
        raise FrameError(f"unknown message kind code {kind}; known 1..{len(KINDS)}")
    if round_ >= 2**63 or step >= 2**63:
        raise FrameError("round and step must be below 2**63")
    if body_length > limits.max_frame_bytes:
        raise FrameError(f"frame body of {body_length} bytes exceeds the limit of {limits.max_frame_bytes}")
    if count > limits.max_tensors:
        raise FrameError(f"frame announces {count} tensors, at most {limits.max_tensors} allowed")
    return Prefix(FrameType(ftype), Method(method), client_id, KINDS[kind - 1] if kind else None, round_, step, body_length, count)


def read_body(prefix: Prefix, read_into: ReadInto, *, allocate: Allocate = _allocate) -> Frame:
    """Read the body a checked prefix announced: typed tensors, or the error it carries."""
    frame = Frame(prefix.type, prefix.method, prefix.client_id, prefix.kind, prefix.round, prefix.step)
    if prefix.type == FrameType.ERROR:
        frame.error = _read_error(prefix, read_into)
        return frame
    heads_bytes = prefix.tensor_count * DESCRIPTOR.size
    if heads_bytes > prefix.body_length:
        raise FrameError(f"{prefix.tensor_count} tensor descriptors do not fit in a body of {prefix.body_length} bytes")
    heads = bytearray(heads_bytes)
    read_into(memoryview(heads))
    specs: list[tuple[torch.dtype, list[int], int]] = []
    total = heads_bytes
    for i in range(prefix.tensor_count):
        code, ndim, *rest = DESCRIPTOR.unpack_from(heads, i * DESCRIPTOR.size)
        dims, nbytes = rest[:MAX_NDIM], rest[MAX_NDIM]
        if not 1 <= code <= len(DTYPES):
            raise FrameError(f"tensor {i}: unknown dtype code {code}")
        if ndim > MAX_NDIM or any(dims[ndim:]):
            raise FrameError(f"tensor {i}: {ndim} dims (at most {MAX_NDIM}, unused dims zero)")
        dtype, shape = DTYPES[code - 1], list(dims[:ndim])
        if any(d > prefix.body_length for d in shape) or math.prod(shape) * dtype.itemsize != nbytes:
            raise FrameError(f"tensor {i}: {nbytes} bytes do not hold a {dtype} tensor of shape {shape}")
        total += nbytes
        if total > prefix.body_length:
            raise FrameError(f"tensors of {total} bytes or more overrun the body of {prefix.body_length} bytes")
        specs.append((dtype, shape, nbytes))
    if total != prefix.body_length:
        raise FrameError(f"the body holds {prefix.body_length} bytes, its tensors {total}")
    for dtype, shape, nbytes in specs:
        buffer = allocate(nbytes)
        if nbytes:
            read_into(memoryview(buffer.numpy()))
        if dtype == torch.bool and nbytes and int(buffer.max()) > 1:
            raise FrameError("a bool tensor holds bytes other than 0 and 1")
        frame.tensors.append(buffer.view(dtype).reshape(shape))
    return frame


def _read_error(prefix: Prefix, read_into: ReadInto) -> Exception:
    if prefix.tensor_count or not ERROR_HEAD.size <= prefix.body_length <= ERROR_HEAD.size + MAX_ERROR_MESSAGE:
        raise FrameError(f"an error frame's body is 3..{ERROR_HEAD.size + MAX_ERROR_MESSAGE} bytes and carries no tensors")
    body = bytearray(prefix.body_length)
    read_into(memoryview(body))
    code, length = ERROR_HEAD.unpack_from(body)
    if not 1 <= code <= len(ERRORS) or ERROR_HEAD.size + length != prefix.body_length:
        raise FrameError(f"error frame with unknown code {code} or a message length {length} that does not match its body")
    return ERRORS[code - 1](bytes(body[ERROR_HEAD.size :]).decode("utf-8", errors="replace"))


def read_frame(read_into: ReadInto, limits: FrameLimits, *, allocate: Allocate = _allocate) -> Frame:
    return read_body(read_prefix(read_into, limits), read_into, allocate=allocate)


def check_request(frame: Frame) -> None:
    """The shape every request of its method must have (the endpoint checks the values)."""
    if frame.type != FrameType.REQUEST:
        raise FrameError(f"expected a request frame, got {frame.type.name}")
    if frame.method == Method.EXCHANGE:
        if frame.kind is None:
            raise FrameError("an exchange frame must name a message kind")
        return
    wanted_kind = frame.method == Method.SEALED
    if (frame.kind is not None) != wanted_kind or frame.round or frame.step:
        raise FrameError(f"a {frame.method.name.lower()} frame {'names a kind and ' if wanted_kind else ''}has no kind/round/step otherwise")
    if len(frame.tensors) != 1 or frame.tensors[0].dtype != torch.uint8 or frame.tensors[0].dim() != 1:
        raise FrameError(f"a {frame.method.name.lower()} frame carries one 1-D uint8 tensor")


class BytesReader:
    """``read_into`` over bytes in memory (tests); running out is a :class:`FrameError`."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.offset = 0

    def __call__(self, view: memoryview) -> None:
        end = self.offset + view.nbytes
        if end > len(self.data):
            raise FrameError(f"truncated frame: needed {end} bytes, got {len(self.data)}")
        view[:] = self.data[self.offset : end]
        self.offset = end


def decode(data: bytes, limits: FrameLimits, *, allocate: Allocate = _allocate) -> Frame:
    """One whole frame from bytes; trailing bytes are a :class:`FrameError`."""
    reader = BytesReader(data)
    frame = read_frame(reader, limits, allocate=allocate)
    if reader.offset != len(data):
        raise FrameError(f"{len(data) - reader.offset} bytes after the frame")
    return frame
