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
    ChannelError,
    HandshakeError,
    MalformedError,
    MessageHeader,
    OversizeError,
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


def _header(kind: str = "test") -> MessageHeader:
    return MessageHeader(client_id=2, round=3, step=7, kind=kind)


def _pair(*, rekey_every: int = 2**20) -> tuple[SealedChannel, SealedChannel]:
    c2s, s2c, sid = os.urandom(32), os.urandom(32), os.urandom(16)
    client = SealedChannel(c2s, s2c, sid, direction="c2s", rekey_every=rekey_every)
    server = SealedChannel(s2c, c2s, sid, direction="s2c", rekey_every=rekey_every)
    return client, server


def _open(channel: SealedChannel, sealed: torch.Tensor, *, kind: str = "test", max_bytes: int = MAX) -> torch.Tensor:
    _, tensors = channel.open(sealed, expect_kind=kind, max_bytes=max_bytes)
    (tensor,) = tensors
    return tensor


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
    tensor = _open(server_keys.server_channel(), client_keys.client_channel().seal(_header(), [torch.ones(3)]))
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
    header, (out, ids) = server.open(client.seal(_header("backward"), [payload, torch.arange(3)]), expect_kind="backward", max_bytes=MAX)
    # Assert
    assert out.dtype == dtype and tuple(out.shape) == shape
    assert out.contiguous().reshape(-1).view(torch.uint8).tolist() == list(raw)
    assert torch.equal(ids, torch.arange(3))
    assert (header.client_id, header.round, header.step, header.counter) == (2, 3, 7, 1)


def test_every_single_byte_flip_is_rejected_and_state_unchanged() -> None:
    """Header fields (version, kind, key epoch, counter, client id, round, step, dtype, shape),
    ciphertext and tag: flipping any one byte of a sealed message is refused."""
    # Prepare
    client, server = _pair()
    sealed = client.seal(_header(), [torch.arange(6.0).reshape(2, 3), torch.ones(2, 3, dtype=torch.int64)])
    header_len = sealed.numel() - (6 * 4 + 6 * 8) - 16
    classes = {"header": range(header_len), "ciphertext": range(header_len, sealed.numel() - 16), "tag": range(sealed.numel() - 16, sealed.numel())}
    # Execute / Assert
    for name, positions in classes.items():
        for index in positions:
            for bit in (0x01, 0x80):
                bad = sealed.clone()
                bad[index] ^= bit
                with pytest.raises(ChannelError):
                    server.open(bad, expect_kind="test", max_bytes=MAX)
                assert server.received == 0, f"{name} byte {index} changed the channel"
    _, (values, ints) = server.open(sealed, expect_kind="test", max_bytes=MAX)
    assert torch.equal(values, torch.arange(6.0).reshape(2, 3)) and torch.equal(ints, torch.ones(2, 3, dtype=torch.int64))


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("truncated", MalformedError),
        ("extended", MalformedError),
        ("replayed", ReplayError),
        ("reordered", ReplayError),
        ("other_session", TamperError),
        ("other_key_same_session", TamperError),
        ("reflected", TamperError),
        ("unexpected_kind", MalformedError),
    ],
)
def test_bad_message_rejected_and_state_unchanged(name: str, error: type[Exception]) -> None:
    # Prepare
    client, server = _pair()
    first = client.seal(_header(), [torch.arange(8.0)])
    _open(server, first)
    second = client.seal(_header(), [torch.arange(8.0) + 1])
    third = client.seal(_header(), [torch.arange(8.0) + 2])
    other_client, _ = _pair()
    other_client.seal(_header(), [torch.zeros(8)])
    forged = SealedChannel(os.urandom(32), os.urandom(32), server.session_id, direction="c2s")
    forged.seal(_header(), [torch.zeros(8)])
    bad = {
        "truncated": lambda: second[:-1],
        "extended": lambda: torch.cat([second, torch.zeros(1, dtype=torch.uint8)]),
        "replayed": lambda: first,
        "reordered": lambda: third,
        "other_session": lambda: other_client.seal(_header(), [torch.zeros(8)]),
        "other_key_same_session": lambda: forged.seal(_header(), [torch.zeros(8)]),
        "reflected": lambda: [server.seal(_header(), [torch.zeros(8)]) for _ in range(2)][-1],  # counter 2 = expected
        "unexpected_kind": lambda: second,
    }[name]()
    # Execute / Assert
    with pytest.raises(error):
        server.open(bad, expect_kind="forward" if name == "unexpected_kind" else "test", max_bytes=MAX)
    assert torch.equal(_open(server, second), torch.arange(8.0) + 1)


def test_peer_with_its_own_valid_keys_cannot_read_another_clients_message() -> None:
    # Prepare: two allowed clients of one server, each with its own session
    server_key = X25519PrivateKey.generate()
    alice, mallory = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    allowed = {public_key_bytes(alice), public_key_bytes(mallory)}
    sessions = {}
    for name, key in (("alice", alice), ("mallory", mallory)):
        state, hello = client_hello(key, public_key_bytes(server_key))
        server_keys, reply = server_accept(server_key, allowed, hello)
        sessions[name] = (client_finish(state, reply).client_channel(), server_keys.server_channel())
    secret = torch.randn(4, 8)
    captured = sessions["alice"][0].seal(_header(), [secret])
    # Execute / Assert: mallory's channels (either end) refuse it; alice's server end opens it
    for channel in (sessions["mallory"][1], SealedChannel(*_mallory_keys(sessions), direction="s2c")):
        with pytest.raises(TamperError):
            channel.open(captured, expect_kind="test", max_bytes=MAX)
    assert torch.equal(_open(sessions["alice"][1], captured), secret)


def _mallory_keys(sessions: dict) -> tuple[bytes, bytes, bytes]:
    """Mallory's session keys, but labelled with alice's session: still the wrong keys."""
    server_end = sessions["mallory"][1]
    alice_server = sessions["alice"][1]
    return server_end._send.key, server_end._recv.key, alice_server.session_id


def test_same_plaintext_twice_gives_different_ciphertexts() -> None:
    # Prepare
    client, _ = _pair()
    payload = torch.arange(64.0)
    # Execute
    a, b = client.seal(_header(), [payload]), client.seal(_header(), [payload])
    # Assert: compare the encrypted parts (headers differ only in the counter)
    assert not torch.equal(a[-64 * 4 - 16 :], b[-64 * 4 - 16 :])


def test_oversize_rejected_before_decrypt() -> None:
    # Prepare
    client, server = _pair()
    sealed = client.seal(_header(), [torch.zeros(1000)])
    # Execute / Assert
    with pytest.raises(OversizeError, match="4000 bytes"):
        _open(server, _flip(sealed, -1), max_bytes=3999)  # a bad tag too: size is checked first
    assert _open(server, sealed, max_bytes=4000).shape == (1000,)


def test_huge_declared_shape_rejected_without_allocating() -> None:
    # Prepare: a header that announces 2**60 elements, followed by nothing
    client, server = _pair()
    sealed = client.seal(_header(), [torch.zeros(2**10)])
    header_len = sealed.numel() - 4 * 2**10 - 16
    header = bytes(sealed[:header_len].tolist())
    forged = header[:-2] + bytes([0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10])  # dims varint -> 2**60
    # Execute / Assert
    with pytest.raises((OversizeError, MalformedError)):
        server.open(torch.tensor(list(forged), dtype=torch.uint8), expect_kind="test", max_bytes=MAX)


def test_rekey_every_n_messages_moves_both_directions_to_new_keys() -> None:
    # Prepare
    client, server = _pair(rekey_every=2)
    initial_key = client._send.key
    # Execute
    for value in range(5):
        sealed = client.seal(_header(), [torch.tensor([float(value)])])
        assert _open(server, sealed).item() == value
        assert _open(client, server.seal(_header(), [torch.tensor([-float(value)])])).item() == -value
    # Assert
    assert client.send_epoch == 2 and server.send_epoch == 2
    assert client._send.key != initial_key
    stale = SealedChannel(os.urandom(32), os.urandom(32), os.urandom(16), direction="c2s", rekey_every=2)
    with pytest.raises(ChannelError):
        server.open(stale.seal(_header(), [torch.zeros(1)]), expect_kind="test", max_bytes=MAX)


def test_ciphertext_hides_plaintext() -> None:
    # Prepare
    client, _ = _pair()
    payload = torch.arange(256, dtype=torch.uint8).repeat(4)
    # Execute
    sealed = bytes(client.seal(_header(), [payload]).tolist())
    # Assert
    assert bytes(range(16)) not in sealed and bytes(range(100, 132)) not in sealed


def test_wire_overhead_of_a_training_step_is_under_64_bytes() -> None:
    # Prepare: the forward request of the benchmark's shapes (hidden 256, batch 16, seq 64)
    client, _ = _pair()
    hidden, mask, pos = torch.zeros(16, 64, 256), torch.ones(16, 64, dtype=torch.int64), torch.arange(64).view(1, 64)
    ctrl = torch.zeros(1, dtype=torch.int64)
    raw = sum(t.numel() * t.element_size() for t in (hidden, mask, pos, ctrl))
    # Execute
    for _ in range(100_000 // 1000):  # counters grow: measure late, with multi-byte varints
        client.seal(MessageHeader(client_id=7, kind="forward", step=123_456), [ctrl])
    sealed = client.seal(MessageHeader(client_id=7, kind="forward", step=123_456), [hidden, mask, pos, ctrl])
    # Assert
    assert sealed.numel() - raw <= 64


def test_keygen_command_writes_a_key_set_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    from flglm.cli import main

    # Execute
    first = main(["keygen", "--dir", str(tmp_path / "keys"), "--clients", "2"])
    before = {p.name: p.read_bytes() for p in (tmp_path / "keys").iterdir()}
    second = main(["keygen", "--dir", str(tmp_path / "keys"), "--clients", "2"])
    single = main(["keygen", "--out", str(tmp_path / "one.key")])
    again = main(["keygen", "--out", str(tmp_path / "one.key")])
    # Assert
    assert (first, second, single, again) == (0, 0, 0, 2)
    assert sorted(before) == ["client0.key", "client0.pub", "client1.key", "client1.pub", "server.key", "server.pub"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "keys").iterdir()} == before  # nothing overwritten
    for name in ("server.key", "client0.key", "client1.key"):
        assert stat.S_IMODE((tmp_path / "keys" / name).stat().st_mode) == 0o600
    assert "refusing to overwrite" in capsys.readouterr().err


def test_rekey_by_volume_and_a_sender_that_skips_a_rekey_is_refused() -> None:
    # Prepare: a key may carry at most 100 payload bytes
    c2s, s2c, sid = os.urandom(32), os.urandom(32), os.urandom(16)
    client = SealedChannel(c2s, s2c, sid, direction="c2s", rekey_bytes=100)
    server = SealedChannel(s2c, c2s, sid, direction="s2c", rekey_bytes=100)
    lax = SealedChannel(c2s, s2c, sid, direction="c2s", rekey_bytes=10**9)  # same keys, never re-keys
    # Execute: 64-byte messages, so every second one needs the next key
    for value in range(4):
        assert _open(server, client.seal(_header(), [torch.full((16,), float(value))]))[0].item() == value
    # Assert
    assert client.send_epoch == 3
    strict = SealedChannel(s2c, c2s, sid, direction="s2c", rekey_bytes=100)
    _open(strict, lax.seal(_header(), [torch.zeros(16)]))
    with pytest.raises(SessionError, match="key epoch 0, expected 1"):
        strict.open(lax.seal(_header(), [torch.zeros(16)]), expect_kind="test", max_bytes=MAX)
