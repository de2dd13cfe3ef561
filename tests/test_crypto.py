"""Identity key files, the handshake and the sealed tensor channel (flglm.crypto)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from flglm.crypto import (
    HandshakeError,
    MalformedError,
    MessageHeader,
    OversizeError,
    RekeyRequired,
    ReplayError,
    SealedChannel,
    SessionError,
    TamperError,
    client_finish,
    client_hello,
    generate_identity,
    load_identity,
    load_public_key,
    public_key_bytes,
    server_accept,
)

MAX = 1 << 20


def _header(kind: str = "hidden") -> MessageHeader:
    return MessageHeader(client_id="client-0", round=3, step=7, kind=kind)


def _pair(*, max_messages: int = 2**24) -> tuple[SealedChannel, SealedChannel]:
    c2s, s2c, sid = os.urandom(32), os.urandom(32), os.urandom(16)
    client = SealedChannel(c2s, s2c, sid, direction="c2s", max_messages=max_messages)
    server = SealedChannel(s2c, c2s, sid, direction="s2c", max_messages=max_messages)
    return client, server


def _flip(sealed: torch.Tensor, index: int) -> torch.Tensor:
    out = sealed.clone()
    out[index] ^= 0x01
    return out


# ---------------------------------------------------------------- keys


def test_identity_file_is_0600_and_loads(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "client.key"
    # Execute
    public = generate_identity(path)
    # Assert
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_bytes(load_identity(path)) == public
    assert load_public_key(str(path.with_suffix(".pub"))) == public
    assert load_public_key(public.hex()) == public


def test_identity_refuses_overwrite_and_open_permissions(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "client.key"
    generate_identity(path)
    # Execute / Assert
    with pytest.raises(FileExistsError, match="client.key"):
        generate_identity(path)
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="client.key"):
        load_identity(path)
    with pytest.raises(FileNotFoundError, match="missing.key"):
        load_identity(tmp_path / "missing.key")
    with pytest.raises(ValueError, match="'abc'"):
        load_public_key("abc")


# ---------------------------------------------------------------- handshake


def test_handshake_gives_matching_keys() -> None:
    # Prepare
    client, server = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    # Execute
    state, hello = client_hello(client, public_key_bytes(server))
    server_keys, reply = server_accept(server, {public_key_bytes(client)}, hello)
    client_keys = client_finish(state, reply)
    # Assert
    assert client_keys == server_keys
    assert client_keys.client_to_server != client_keys.server_to_client
    _, tensor = server_keys.server_channel().open(client_keys.client_channel().seal(_header(), torch.ones(3)), max_bytes=MAX)
    assert torch.equal(tensor, torch.ones(3))


def test_server_refuses_client_not_allowed() -> None:
    # Prepare
    client, server = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    _, hello = client_hello(client, public_key_bytes(server))
    # Execute / Assert
    with pytest.raises(HandshakeError, match="client key not allowed"):
        server_accept(server, {public_key_bytes(X25519PrivateKey.generate())}, hello)


def test_client_detects_wrong_server() -> None:
    # Prepare
    client, server, impostor = (X25519PrivateKey.generate() for _ in range(3))
    state, hello = client_hello(client, public_key_bytes(server))
    # Execute
    _, reply = server_accept(impostor, {public_key_bytes(client)}, hello)
    # Assert
    with pytest.raises(HandshakeError, match="server key does not match the pinned key"):
        client_finish(state, reply)


# ---------------------------------------------------------------- channel


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), max_size=4).map(tuple),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.float16, torch.bool, torch.uint8]),
    data=st.data(),
)
def test_seal_open_round_trip(shape: tuple[int, ...], dtype: torch.dtype, data: st.DataObject) -> None:
    # Prepare
    client, server = _pair()
    numel = torch.Size(shape).numel()
    raw = data.draw(st.binary(min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize))
    if dtype == torch.bool:
        raw = bytes(b & 1 for b in raw)
    payload = torch.tensor(list(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    # Execute
    header, out = server.open(client.seal(_header("grad"), payload), expect_kind="grad", max_bytes=MAX)
    # Assert
    assert out.dtype == dtype and tuple(out.shape) == shape
    assert out.contiguous().reshape(-1).view(torch.uint8).tolist() == list(raw)
    assert (header.client_id, header.round, header.step, header.counter) == ("client-0", 3, 7, 1)


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("ciphertext_byte", TamperError),
        ("header_byte", TamperError),
        ("truncated", MalformedError),
        ("replayed", ReplayError),
        ("reordered", ReplayError),
        ("other_session", SessionError),
        ("other_key_same_session", TamperError),
        ("reflected", SessionError),
    ],
)
def test_bad_message_rejected_and_state_unchanged(name: str, error: type[Exception]) -> None:
    # Prepare
    client, server = _pair()
    first = client.seal(_header(), torch.arange(8.0))
    server.open(first, max_bytes=MAX)
    second = client.seal(_header(), torch.arange(8.0) + 1)
    third = client.seal(_header(), torch.arange(8.0) + 2)
    other_client, _ = _pair()
    other_client.seal(_header(), torch.zeros(8))
    forged = SealedChannel(os.urandom(32), os.urandom(32), server.session_id, direction="c2s")
    forged.seal(_header(), torch.zeros(8))
    bad = {
        "ciphertext_byte": lambda: _flip(second, -20),
        "header_byte": lambda: _flip(second, 40),  # inside the step field
        "truncated": lambda: second[:-1],
        "replayed": lambda: first,
        "reordered": lambda: third,
        "other_session": lambda: other_client.seal(_header(), torch.zeros(8)),
        "other_key_same_session": lambda: forged.seal(_header(), torch.zeros(8)),
        "reflected": lambda: server.seal(_header(), torch.zeros(8)),
    }[name]()
    # Execute / Assert
    with pytest.raises(error):
        server.open(bad, max_bytes=MAX)
    _, out = server.open(second, max_bytes=MAX)
    assert torch.equal(out, torch.arange(8.0) + 1)


def test_oversize_rejected_before_decrypt() -> None:
    # Prepare
    client, server = _pair()
    sealed = client.seal(_header(), torch.zeros(1000))
    # Execute / Assert
    with pytest.raises(OversizeError, match="4000 bytes"):
        server.open(_flip(sealed, -1), max_bytes=3999)  # a bad tag too: size is checked first
    _, out = server.open(sealed, max_bytes=4000)
    assert out.shape == (1000,)


def test_rekey_both_sides_and_message_limit() -> None:
    # Prepare
    client, server = _pair(max_messages=2)
    old = client.seal(_header(), torch.zeros(1))
    client.seal(_header(), torch.zeros(1))
    # Execute
    with pytest.raises(RekeyRequired):
        client.seal(_header(), torch.zeros(1))
    client.rekey()
    server.rekey()
    # Assert
    with pytest.raises(TamperError):
        server.open(old, max_bytes=MAX)  # counter 1, but sealed under the old key
    for value in (1.0, 2.0):
        _, out = server.open(client.seal(_header(), torch.tensor([value])), max_bytes=MAX)
        assert out.item() == value
    _, back = client.open(server.seal(_header(), torch.tensor([5.0])), max_bytes=MAX)
    assert back.item() == 5.0


def test_ciphertext_hides_plaintext() -> None:
    # Prepare
    client, _ = _pair()
    payload = torch.arange(256, dtype=torch.uint8).repeat(4)
    # Execute
    sealed = bytes(client.seal(_header(), payload).tolist())
    # Assert
    assert bytes(range(16)) not in sealed and bytes(range(100, 132)) not in sealed
