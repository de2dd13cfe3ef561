"""The encrypted link end to end, in one process: client link -> sealed messages -> server endpoint.

Encryption must be lossless (same losses and weights as in the clear), must refuse strangers
at the handshake, and a rejected message of any kind must leave the server byte-identical.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flglm.client.lm import SplitCausalLM
from flglm.client.remote import RemoteMiddle
from flglm.client.server_link import ServerLink
from flglm.config import ConfigError, RunConfig, fingerprint
from flglm.crypto import ChannelError, HandshakeError, ReplayError
from flglm.crypto.keyring import generate_key_set, load_client_keys, load_server_keys
from flglm.crypto.keys import generate_identity, load_identity
from flglm.crypto.sessions import ClientSession, ServerSessions
from flglm.link.messages import InvalidMessageError
from flglm.link.protocol import json_tensor
from flglm.models import ClientBlocks
from flglm.models.split import plan_for
from flglm.optim import build_optimizer
from flglm.server.endpoint import ServerEndpoint
from flglm.server.middle_server import MiddleServer

LIMIT = 1 << 20


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    generate_key_set(tmp_path / "keys", num_clients=2)
    return tmp_path / "keys"


@pytest.fixture
def cfg(tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]) -> RunConfig:
    return make_run_config(tiny_model_configs["llama"], "federation.num_clients=2")


def _sessions(keys: Path) -> ServerSessions:
    k = load_server_keys(keys, 2)
    return ServerSessions(k.identity, k.client_keys, max_message_bytes=LIMIT)


def _client_session(keys: Path, client: int = 0) -> ClientSession:
    k = load_client_keys(keys, client, 2)
    return ClientSession(client, k.identity, k.server_key, max_message_bytes=LIMIT)


def _model(cfg: RunConfig, link: ServerLink) -> SplitCausalLM:
    info = link.hello(fingerprint(cfg), "tok")
    return SplitCausalLM(ClientBlocks(cfg.model, plan_for(cfg.model, cfg.split)), RemoteMiddle(link, server_info=info))


def _train(lm: SplitCausalLM, link: ServerLink, cfg: RunConfig, steps: int) -> list[float]:
    optimizer = build_optimizer([p for p in lm.parameters() if p.requires_grad], cfg.optim)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        ids = torch.randint(3, 128, (3, 9), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        logits = lm(ids, mask)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        link.step(client_step=step, total_steps=steps)
        losses.append(loss.item())
    return losses


def _state_digest(server: MiddleServer, sessions: ServerSessions | None = None) -> str:
    """A hash of everything a message could change: weights, grads, optimizer, pending, sessions."""
    h = hashlib.sha256()
    for name, p in server.middle.hf.named_parameters():
        h.update(name.encode() + p.detach().numpy().tobytes())
        if p.grad is not None:
            h.update(b"grad" + p.grad.numpy().tobytes())
    for state in server.optimizer.state.values() if server.optimizer else ():
        for value in state.values():
            h.update(value.numpy().tobytes() if isinstance(value, torch.Tensor) else repr(value).encode())
    h.update(repr(sorted(server.compute.pending.keys())).encode())
    if sessions is not None:
        for cid, slot in sorted(sessions._slots.items()):
            for channel in (slot.active, slot.pending):
                h.update(repr((cid, channel and (channel.sent, channel.received, channel.session_id))).encode())
    return h.hexdigest()


def test_encrypted_training_equals_plain_training_exactly(cfg: RunConfig, keys: Path) -> None:
    # Prepare
    plain_server, sealed_server = MiddleServer(cfg), MiddleServer(cfg)
    plain = ServerLink(ServerEndpoint(plain_server), client_id=0, timeout_s=30)
    sealed = ServerLink(ServerEndpoint(sealed_server, _sessions(keys)), client_id=0, timeout_s=30, session=_client_session(keys))
    sealed.handshake()
    plain_lm, sealed_lm = _model(cfg, plain), _model(cfg, sealed)
    # Execute
    plain_losses = _train(plain_lm, plain, cfg, steps=4)
    sealed_losses = _train(sealed_lm, sealed, cfg, steps=4)
    # Assert: bit-identical losses, client weights and server weights
    assert sealed_losses == plain_losses
    for (name, a), (_, b) in zip(plain_lm.named_parameters(), sealed_lm.named_parameters()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(plain_server.middle.hf.named_parameters(), sealed_server.middle.hf.named_parameters()):
        assert torch.equal(a, b), name
    assert sealed.wire_bytes > sealed.payload_bytes == plain.payload_bytes


def test_unknown_client_is_refused_at_the_handshake(cfg: RunConfig, keys: Path, tmp_path: Path) -> None:
    # Prepare: a client with a valid key pair that is not on the server's list
    generate_identity(tmp_path / "stranger.key")
    stranger = ClientSession(0, load_identity(tmp_path / "stranger.key"), load_client_keys(keys, 0, 2).server_key, max_message_bytes=LIMIT)
    link = ServerLink(ServerEndpoint(MiddleServer(cfg), _sessions(keys)), client_id=0, timeout_s=30, session=stranger)
    # Execute / Assert
    with pytest.raises(HandshakeError, match="client 0: client key not allowed"):
        link.handshake()
    with pytest.raises(HandshakeError, match="not in the server's list of allowed clients"):
        _sessions(keys).accept(7, stranger.hello())


def test_client_refuses_a_server_that_is_not_the_pinned_one(cfg: RunConfig, keys: Path, tmp_path: Path) -> None:
    # Prepare: an impostor server that knows the client's public key but not the real server's private key
    generate_identity(tmp_path / "impostor.key")
    impostor = ServerSessions(load_identity(tmp_path / "impostor.key"), load_server_keys(keys, 2).client_keys, max_message_bytes=LIMIT)
    link = ServerLink(ServerEndpoint(MiddleServer(cfg), impostor), client_id=0, timeout_s=30, session=_client_session(keys))
    # Execute / Assert
    with pytest.raises(HandshakeError, match="does not match the pinned key"):
        link.handshake()
    assert not link.session.connected


def test_clear_messages_refused_by_an_encrypted_server_and_vice_versa(cfg: RunConfig, keys: Path) -> None:
    # Prepare
    encrypted = ServerLink(ServerEndpoint(MiddleServer(cfg), _sessions(keys)), client_id=0, timeout_s=30)
    clear_server = ServerLink(ServerEndpoint(MiddleServer(cfg)), client_id=0, timeout_s=30, session=_client_session(keys))
    # Execute / Assert
    with pytest.raises(ChannelError, match="requires encryption"):
        encrypted.hello(fingerprint(cfg), "tok")
    with pytest.raises(ChannelError, match="runs without encryption"):
        clear_server.handshake()


def test_a_peer_cannot_use_another_clients_captured_message(cfg: RunConfig, keys: Path) -> None:
    # Prepare: client 0 and client 1 both hold valid sessions; client 1 captures client 0's forward
    sessions = _sessions(keys)
    server = MiddleServer(cfg)
    endpoint = ServerEndpoint(server, sessions)
    alice = ServerLink(endpoint, client_id=0, timeout_s=30, session=_client_session(keys, 0))
    mallory = ServerLink(endpoint, client_id=1, timeout_s=30, session=_client_session(keys, 1))
    alice.handshake()
    mallory.handshake()
    captured = alice.session.seal("join", [torch.zeros(3, dtype=torch.uint8)])
    before = _state_digest(server, sessions)
    # Execute / Assert: mallory can neither read it nor pass it off as her own
    with pytest.raises(ChannelError):
        mallory.session.open(captured, expect_kind="join")
    with pytest.raises(ChannelError):
        endpoint.sealed(1, "join", captured).wait()
    assert _state_digest(server, sessions) == before


def _tampered(sealed: torch.Tensor) -> dict[str, torch.Tensor]:
    flipped = {}
    for name, index in (("header", 1), ("counter", 3), ("ciphertext", sealed.numel() // 2), ("tag", -1)):
        bad = sealed.clone()
        bad[index] ^= 0x04
        flipped[name] = bad
    flipped["truncated"] = sealed[:-5].clone()
    return flipped


@pytest.mark.parametrize("kind", ["forward", "backward", "step", "leave"])
def test_rejected_message_leaves_the_server_byte_identical(cfg: RunConfig, keys: Path, kind: str) -> None:
    # Prepare: a client mid-step (a forward pending), then a bad message of each kind
    sessions = _sessions(keys)
    server = MiddleServer(cfg)
    endpoint = ServerEndpoint(server, sessions)
    link = ServerLink(endpoint, client_id=0, timeout_s=30, session=_client_session(keys))
    lm = _model(cfg, link)
    ids = torch.randint(3, 128, (2, 6))
    logits = lm(ids, torch.ones_like(ids))
    payloads = {
        "forward": [torch.randn(2, 6, 64), torch.ones(2, 6, dtype=torch.int64), torch.arange(6).view(1, 6), torch.zeros(1, dtype=torch.int64)],
        "backward": [torch.ones(2, 6, 64)],
        "step": [torch.tensor([0.0, 1.0, 1.0, float("nan")], dtype=torch.float64)],
        "leave": [json_tensor({"steps": 1.0})],
    }
    good = link.session.seal(kind, payloads[kind], step=99 if kind == "forward" else 0)
    before = _state_digest(server, sessions)
    # Execute / Assert
    for name, bad in _tampered(good).items():
        with pytest.raises(ChannelError):
            endpoint.sealed(0, kind, bad).wait()
        assert _state_digest(server, sessions) == before, name
    # the genuine message still opens after all the rejected ones, and only once
    endpoint.sealed(0, kind, good).wait()
    after = _state_digest(server, sessions)
    with pytest.raises(ChannelError if kind == "leave" else ReplayError):  # after leave: no session at all
        endpoint.sealed(0, kind, good).wait()
    assert _state_digest(server, sessions) == after
    del logits


# Hypothesis runs all of a test's examples with the same function-scoped fixtures: the fuzz
# tests below meet one server each (building it is most of an example's cost), and each example
# asserts it leaves that server exactly as it found it.


@pytest.fixture
def sealed_server(cfg: RunConfig, keys: Path) -> tuple[MiddleServer, ServerEndpoint, ServerSessions]:
    """A server with client 0's proven session."""
    sessions = _sessions(keys)
    server = MiddleServer(cfg)
    endpoint = ServerEndpoint(server, sessions)
    ServerLink(endpoint, client_id=0, timeout_s=30, session=_client_session(keys)).handshake()
    return server, endpoint, sessions


@pytest.fixture
def clear_server(cfg: RunConfig) -> tuple[MiddleServer, ServerEndpoint]:
    """A server in the clear, joined by client 0."""
    server = MiddleServer(cfg)
    endpoint = ServerEndpoint(server)
    ServerLink(endpoint, client_id=0, timeout_s=30).hello(fingerprint(cfg), "tok")
    return server, endpoint


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    garbage=st.one_of(
        st.binary(min_size=0, max_size=300),
        st.builds(lambda n, tail: bytes([1, 2]) + bytes([0x80] * n) + tail, st.integers(0, 12), st.binary(max_size=40)),
        st.builds(
            lambda dims, tail: bytes([1, 2, 0, 1, 0, 0, 0, 1, 0, len(dims)]) + b"".join(_varint(d) for d in dims) + tail,
            st.lists(st.integers(0, 2**62), min_size=1, max_size=8),
            st.binary(max_size=64),
        ),
    ),
    kind=st.sampled_from(["forward", "backward", "join", "step", "agg_upload", "nonsense"]),
)
def test_fuzzed_sealed_messages_never_crash_and_always_get_a_clear_error(
    sealed_server: tuple[MiddleServer, ServerEndpoint, ServerSessions], garbage: bytes, kind: str
) -> None:
    # Prepare
    server, endpoint, sessions = sealed_server
    before = _state_digest(server, sessions)
    message = torch.tensor(list(garbage), dtype=torch.uint8)
    # Execute / Assert
    with pytest.raises((ChannelError, InvalidMessageError)) as info:
        endpoint.sealed(0, kind, message).wait()
    assert str(info.value)
    assert _state_digest(server, sessions) == before


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shapes=st.lists(st.lists(st.integers(0, 5), max_size=4), max_size=5),
    dtype=st.sampled_from([torch.float32, torch.int64, torch.uint8, torch.float64]),
    kind=st.sampled_from(["forward", "infer", "backward", "join", "step", "grad_norms", "agg_upload", "leave"]),
)
def test_fuzzed_clear_messages_get_a_clear_error(
    clear_server: tuple[MiddleServer, ServerEndpoint], shapes: list[list[int]], dtype: torch.dtype, kind: str
) -> None:
    # Prepare: a server in the clear, joined client 0
    server, endpoint = clear_server
    before = _state_digest(server)
    tensors = [torch.zeros(shape, dtype=dtype) for shape in shapes]
    # Execute
    try:
        endpoint.exchange(0, kind, 0, 0, tensors).wait()
    except (InvalidMessageError, ValueError) as exc:
        assert str(exc)
    # Assert: whatever happened, no half-done change (a well-formed grad_norms may pass)
    assert _state_digest(server) == before


def test_public_keys_listed_in_the_config_decide_who_is_allowed(
    keys: Path, tmp_path: Path, tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    # Prepare: the config lists client 1's key as client 0's (hex) and client 1 by path
    client1_hex = (keys / "client1.pub").read_text().strip()
    listed = load_server_keys(keys, 2, client_public_keys=[client1_hex, str(keys / "client1.pub")])
    sessions = ServerSessions(listed.identity, listed.client_keys, max_message_bytes=LIMIT)
    cfg = make_run_config(tiny_model_configs["llama"], "federation.num_clients=2")
    link = ServerLink(ServerEndpoint(MiddleServer(cfg), sessions), client_id=0, timeout_s=30, session=_client_session(keys, 0))
    # Execute / Assert: the real client 0 (whose key is not the listed one) is refused
    with pytest.raises(HandshakeError, match="client key not allowed"):
        link.handshake()
    with pytest.raises(ConfigError, match="lists 1 keys for federation.num_clients=2"):
        make_run_config(tiny_model_configs["llama"], "federation.num_clients=2", f"crypto.client_public_keys=[{client1_hex}]")
