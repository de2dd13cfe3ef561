"""The socket link's wire format: round trips, and every malformed frame is a clean FrameError
that allocates nothing past the limits (hypothesis fuzzing)."""

from __future__ import annotations

import pickle
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flglm.crypto.errors import HandshakeError, ReplayError
from flglm.link import frames as F
from flglm.link.messages import InvalidMessageError
from flglm.link.protocol import KINDS, REPLY_KIND
from flglm.link.rpc_entries import ENTRY_NAMES

LIMITS = F.FrameLimits(max_frame_bytes=1 << 16)


def _bytes(frame: F.Frame) -> bytes:
    return b"".join(bytes(b) for b in F.encode(frame))


def _request(**changes: object) -> F.Frame:
    tensors = [torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.int64), torch.arange(3).view(1, 3), torch.tensor([1])]
    frame = F.Frame(F.FrameType.REQUEST, F.Method.EXCHANGE, 7, "forward", 0, 5, tensors)
    for key, value in changes.items():
        setattr(frame, key, value)
    return frame


class _Recorder:
    """An allocator that records what a decode asked for."""

    def __init__(self) -> None:
        self.total = 0

    def __call__(self, nbytes: int) -> torch.Tensor:
        self.total += nbytes
        return torch.empty(nbytes, dtype=torch.uint8)


def test_the_tables_hold_the_three_entries_and_every_kind() -> None:
    assert sorted(F.METHOD_OF_NAME) == sorted(ENTRY_NAMES) and len(F.Method) == 3
    assert set(KINDS) == set(REPLY_KIND) and len(KINDS) == len(set(KINDS))


@pytest.mark.parametrize(
    "tensors",
    [
        [torch.randn(2, 3).bfloat16(), torch.tensor(True), torch.zeros(0, 5, dtype=torch.float16)],
        [torch.randn(1, 2, 1, 1, 2, 1, 1, 2, dtype=torch.float64), torch.tensor([1, 0, 1], dtype=torch.bool)],
        [],
        [torch.randn(4, 6)[:, ::2]],  # a strided view crosses as its values
    ],
    ids=["mixed", "8-dims", "none", "view"],
)
def test_a_frame_round_trips_bit_for_bit(tensors: list[torch.Tensor]) -> None:
    frame = _request(tensors=tensors, kind="agg_upload", round=2**62, step=3)
    back = F.decode(_bytes(frame), LIMITS)
    assert (back.type, back.method, back.client_id, back.kind, back.round, back.step) == (
        F.FrameType.REQUEST, F.Method.EXCHANGE, 7, "agg_upload", 2**62, 3,
    )  # fmt: skip
    assert len(back.tensors) == len(tensors)
    for sent, got in zip(tensors, back.tensors, strict=True):
        assert got.dtype == sent.dtype and got.shape == sent.shape and torch.equal(got, sent)


@pytest.mark.parametrize(
    ("error", "cls", "text"),
    [
        (InvalidMessageError("bad batch"), InvalidMessageError, "bad batch"),
        (HandshakeError("client key not allowed"), HandshakeError, "client key not allowed"),
        (ReplayError("counter"), ReplayError, "counter"),
        (KeyError("secret"), RuntimeError, "KeyError: 'secret'"),
        (ValueError("x" * 10_000), ValueError, "x" * F.MAX_ERROR_MESSAGE),
    ],
)
def test_an_error_frame_names_only_an_allowlisted_class(error: Exception, cls: type, text: str) -> None:
    frame = F.Frame(F.FrameType.ERROR, F.Method.SEALED, 1, "step", error=error)
    back = F.decode(_bytes(frame), LIMITS)
    assert type(back.error) is cls and str(back.error) == text


def _with_prefix(data: bytes, **fields: int) -> bytes:
    names = ["magic", "version", "type", "method", "kind", "client_id", "round", "step", "body_length", "count"]
    values = dict(zip(names, F.PREFIX.unpack_from(data), strict=True))
    values.update(fields)
    return F.PREFIX.pack(*values.values()) + data[F.PREFIX.size :]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"magic": b"\x80\x04\x95\x00"}, "not a flglm frame"),  # a pickle's first bytes
        ({"version": 2}, "version 2"),
        ({"type": 9}, "unknown frame type"),
        ({"method": 0}, "unknown method code 0"),
        ({"method": 4}, "unknown method code 4"),
        ({"method": 255}, "unknown method code 255"),
        ({"kind": len(KINDS) + 1}, "unknown message kind code"),
        ({"body_length": 2**40}, "exceeds the limit"),
        ({"count": 200}, "at most 16"),
        ({"round": 2**63}, r"below 2\*\*63"),
    ],
)
def test_a_bad_prefix_is_refused_before_anything_is_allocated(fields: dict, message: str) -> None:
    recorder = _Recorder()
    with pytest.raises(F.FrameError, match=message):
        F.decode(_with_prefix(_bytes(_request()), **fields), LIMITS, allocate=recorder)
    assert recorder.total == 0


def test_inconsistent_descriptors_and_bool_bytes_are_refused() -> None:
    data = bytearray(_bytes(_request(tensors=[torch.ones(4, dtype=torch.float32)])))
    struct.pack_into("<Q", data, F.PREFIX.size + 2 + 6, 5)  # dim 4 -> 5: 20 bytes announced as 16
    with pytest.raises(F.FrameError, match="do not hold"):
        F.decode(bytes(data), LIMITS)
    data = bytearray(_bytes(_request(tensors=[torch.ones(4, dtype=torch.bool)])))
    data[-1] = 7
    with pytest.raises(F.FrameError, match="bool"):
        F.decode(bytes(data), LIMITS)
    with pytest.raises(F.FrameError, match="after the frame"):
        F.decode(_bytes(_request()) + b"\0", LIMITS)


def test_a_pickle_is_only_bytes() -> None:
    blob = pickle.dumps({"eval": "__import__('os').system('touch marker')"})
    with pytest.raises(F.FrameError, match="not a flglm frame"):
        F.decode(blob, LIMITS)
    frame = F.decode(_bytes(_request(tensors=[torch.frombuffer(bytearray(blob), dtype=torch.uint8)])), LIMITS)
    assert frame.tensors[0].numpy().tobytes() == blob  # a payload stays a uint8 tensor, never unpickled


def test_check_request_wants_the_shape_of_each_method() -> None:
    hello = torch.zeros(68, dtype=torch.uint8)
    F.check_request(F.Frame(F.FrameType.REQUEST, F.Method.HANDSHAKE, 0, tensors=[hello]))
    F.check_request(F.Frame(F.FrameType.REQUEST, F.Method.SEALED, 0, "join", tensors=[hello]))
    for bad in (
        F.Frame(F.FrameType.REQUEST, F.Method.HANDSHAKE, 0, "join", tensors=[hello]),
        F.Frame(F.FrameType.REQUEST, F.Method.SEALED, 0, None, tensors=[hello]),
        F.Frame(F.FrameType.REQUEST, F.Method.SEALED, 0, "join", tensors=[hello, hello]),
        F.Frame(F.FrameType.REQUEST, F.Method.HANDSHAKE, 0, tensors=[torch.zeros(2)]),
        F.Frame(F.FrameType.REQUEST, F.Method.EXCHANGE, 0, None),
        F.Frame(F.FrameType.REPLY, F.Method.EXCHANGE, 0, "join"),
    ):
        with pytest.raises(F.FrameError):
            F.check_request(bad)


def _decode_cleanly(data: bytes) -> None:
    """Decoding ``data`` either works or raises FrameError, and never allocates past the limit."""
    recorder = _Recorder()
    try:
        F.decode(data, LIMITS, allocate=recorder)
    except F.FrameError:
        pass
    assert recorder.total <= LIMITS.max_frame_bytes


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_cleanly(data)
    _decode_cleanly(F.MAGIC + bytes([F.VERSION]) + data)  # past the magic, into the checks


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 255), st.binary(min_size=1, max_size=8))
def test_fuzz_truncated_and_corrupted_frames(cut: int, position: int, junk: bytes) -> None:
    data = _bytes(_request())
    _decode_cleanly(data[: cut % len(data)])
    corrupted = bytearray(data)
    where = position * 7 % (F.PREFIX.size + 4 * F.DESCRIPTOR.size)
    corrupted[where : where + len(junk)] = junk
    _decode_cleanly(bytes(corrupted[: len(data)]))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**16 - 1), st.integers(0, 2**64 - 1), st.integers(0, 255))
def test_fuzz_oversize_announcements(body_length: int, count: int, dim: int, ndim: int) -> None:
    data = bytearray(_with_prefix(_bytes(_request()), body_length=body_length, count=count))
    struct.pack_into("<BB6xQ", data, F.PREFIX.size, 1, ndim % 12, dim)
    _decode_cleanly(bytes(data))
