"""Tests for the server's message checks and its per-request state.

A malformed message must be rejected with an error naming what is wrong, and must leave the
server exactly as it was: same pending requests, byte-identical middle parameters, no
gradients, one more rejection counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from flglm.config import RunConfig
from flglm.link.crossing import Crossing
from flglm.link.messages import InvalidMessageError, RequestHeader
from flglm.server.middle_server import MiddleServer

HIDDEN = 64
MAX_POSITIONS = 64


@pytest.fixture
def make_server(
    tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> Callable[..., MiddleServer]:
    """``make_server(*overrides)``: a server of the tiny llama (blocks 1 and 2 of 4)."""

    def make(*overrides: str) -> MiddleServer:
        return MiddleServer(make_run_config(tiny_model_configs["llama"], *overrides))

    return make


@pytest.fixture
def server(make_server: Callable[..., MiddleServer]) -> MiddleServer:
    return make_server("server.max_batch_size=4")


def _header(request_id: int, client_id: int = 0) -> RequestHeader:
    return RequestHeader(client_id=client_id, request_id=request_id)


def _inputs(batch: int = 2, length: int = 5, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A valid forward request: hidden states, attention mask, position ids."""
    hidden = torch.randn(batch, length, HIDDEN, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2 :] = 0
    return hidden, mask, torch.arange(length).unsqueeze(0)


def _snapshot(server: MiddleServer) -> dict[str, Any]:
    return {
        "pending": server.pending_count(),
        "state": {name: tensor.clone() for name, tensor in server.middle.state_dict().items()},
        "grads": {name: None if p.grad is None else p.grad.clone() for name, p in server.middle.named_parameters()},
        "rejected": server.stats.rejected,
        "forwards": server.stats.forwards,
        "backwards": server.stats.backwards,
    }


def _assert_unchanged_but_rejected(server: MiddleServer, before: dict[str, Any]) -> None:
    after = _snapshot(server)
    assert after["pending"] == before["pending"]
    assert after["state"].keys() == before["state"].keys()
    for name, tensor in after["state"].items():
        old = before["state"][name]
        assert tensor.dtype == old.dtype and tensor.shape == old.shape, name
        assert bytes(tensor.numpy().tobytes()) == bytes(old.numpy().tobytes()), f"{name} changed"
    for name, grad in after["grads"].items():
        old = before["grads"][name]
        assert (grad is None and old is None) or torch.equal(grad, old), f"gradient of {name} changed"
    assert (after["forwards"], after["backwards"]) == (before["forwards"], before["backwards"])
    assert after["rejected"] == before["rejected"] + 1


def _bad_forwards() -> list[tuple[str, Callable[[], tuple[Any, Any, Any]], str]]:
    """(case, make (hidden, mask, pos), regex the error must match)."""

    def replace(**changes: Any) -> Callable[[], tuple[Any, Any, Any]]:
        def make() -> tuple[Any, Any, Any]:
            hidden, mask, pos = _inputs()
            values = {"hidden": hidden, "mask": mask, "pos": pos}
            for key, change in changes.items():
                values[key] = change(values[key])
            return values["hidden"], values["mask"], values["pos"]

        return make

    def with_nan(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        hidden[0, 1, 2] = float("nan")
        return hidden

    return [
        ("int64 hidden", replace(hidden=lambda h: h.long()), r"hidden states .* got torch\.int64"),
        ("float64 hidden", replace(hidden=lambda h: h.double()), r"hidden states .* got torch\.float64"),
        ("hidden size", replace(hidden=lambda h: h[..., :32]), r"hidden states .*\[batch, seq, 64\].*\[2, 5, 32\]"),
        ("rank 2 hidden", replace(hidden=lambda h: h[0]), r"hidden states .*\[5, 64\]"),
        ("rank 4 hidden", replace(hidden=lambda h: h.unsqueeze(0)), r"hidden states .*\[1, 2, 5, 64\]"),
        ("not a tensor", replace(hidden=lambda h: h.tolist()), r"hidden states must be a tensor, got list"),
        ("mask shape", replace(mask=lambda m: m[:, :4]), r"attention mask .*\[2, 5\].*\[2, 4\]"),
        ("mask dtype", replace(mask=lambda m: m.float()), r"attention mask .*torch\.float32"),
        ("mask values", replace(mask=lambda m: m * 2), r"attention mask values must be 0 or 1"),
        ("position too large", replace(pos=lambda p: p + MAX_POSITIONS - 4), rf"position ids must lie in \[0, {MAX_POSITIONS}\)"),
        ("negative position", replace(pos=lambda p: p - 1), r"position ids must lie in"),
        ("position shape", replace(pos=lambda p: p[:, :3]), r"position ids must be int64 of shape"),
        ("position dtype", replace(pos=lambda p: p.int()), r"position ids must be int64 .*torch\.int32"),
        ("NaN", replace(hidden=with_nan), r"hidden states contain NaN or Inf"),
        ("Inf", replace(hidden=lambda h: h / 0.0), r"hidden states contain NaN or Inf"),
        ("batch too large", lambda: _inputs(batch=5), r"batch of 5 exceeds server\.max_batch_size=4"),
        ("empty", lambda: _inputs(batch=2, length=0), r"hidden states are empty"),
        (
            "sequence too long",
            lambda: _inputs(batch=1, length=MAX_POSITIONS + 1),
            rf"sequence length {MAX_POSITIONS + 1} exceeds the model's limit of {MAX_POSITIONS}",
        ),
    ]


BAD_FORWARDS = _bad_forwards()


@pytest.mark.parametrize("method", ["forward", "infer"])
def test_malformed_forward_is_rejected_and_changes_nothing(server: MiddleServer, method: str) -> None:
    # One server for every case, with a forward already pending: a rejection must not touch it.
    server.forward(_header(0), Crossing(*_inputs()))
    for request_id, (case, make, expected) in enumerate(BAD_FORWARDS, start=1):
        before = _snapshot(server)

        with pytest.raises(InvalidMessageError, match=expected):
            getattr(server, method)(_header(request_id), Crossing(*make()))

        _assert_unchanged_but_rejected(server, before)
    # The pending forward survived all of it.
    server.backward(_header(0), torch.ones(2, 5, HIDDEN))
    assert server.pending_count() == 0


def test_every_bad_forward_case_names_client_and_request(server: MiddleServer) -> None:
    for case, make, _ in BAD_FORWARDS:
        with pytest.raises(InvalidMessageError, match="client 3 request 17"):
            server.forward(_header(17, client_id=3), Crossing(*make()))


def test_malformed_header_is_rejected(server: MiddleServer) -> None:
    before = _snapshot(server)

    with pytest.raises(InvalidMessageError, match="expected a RequestHeader, got tuple"):
        server.forward((0, 0), Crossing(*_inputs()))

    _assert_unchanged_but_rejected(server, before)
    with pytest.raises(InvalidMessageError, match="autocast='float64'"):
        server.forward(RequestHeader(client_id=0, request_id=1, autocast="float64"), Crossing(*_inputs()))


@pytest.mark.parametrize(
    ("case", "grad", "expected"),
    [
        ("shape", torch.ones(2, 4, HIDDEN), r"gradient must be float of shape \[2, 5, 64\], got torch\.float32 \[2, 4, 64\]"),
        ("dtype", torch.ones(2, 5, HIDDEN, dtype=torch.float64), r"gradient must be float .*torch\.float64"),
        ("NaN", torch.full((2, 5, HIDDEN), float("nan")), r"gradient contains NaN or Inf"),
        ("not a tensor", [[0.0]], r"gradient must be a tensor, got list"),
    ],
    ids=["shape", "dtype", "NaN", "not-a-tensor"],
)
def test_malformed_gradient_is_rejected_and_changes_nothing(
    server: MiddleServer, case: str, grad: Any, expected: str
) -> None:
    server.forward(_header(0), Crossing(*_inputs()))
    before = _snapshot(server)

    with pytest.raises(InvalidMessageError, match=expected):
        server.backward(_header(0), grad)

    _assert_unchanged_but_rejected(server, before)
    # The forward's state is still there: a correct gradient still goes through.
    grad_in = server.backward(_header(0), torch.ones(2, 5, HIDDEN))
    assert grad_in.shape == (2, 5, HIDDEN)
    assert server.pending_count() == 0


def test_backward_for_an_unknown_request_is_rejected(server: MiddleServer) -> None:
    server.forward(_header(0), Crossing(*_inputs()))
    before = _snapshot(server)

    with pytest.raises(InvalidMessageError, match="client 0 request 99: no pending forward"):
        server.backward(_header(99), torch.ones(2, 5, HIDDEN))
    _assert_unchanged_but_rejected(server, before)

    before = _snapshot(server)
    with pytest.raises(InvalidMessageError, match="client 1 request 0: no pending forward"):
        server.backward(_header(0, client_id=1), torch.ones(2, 5, HIDDEN))
    _assert_unchanged_but_rejected(server, before)


def test_duplicate_request_id_is_rejected_and_changes_nothing(server: MiddleServer) -> None:
    server.forward(_header(0), Crossing(*_inputs()))
    before = _snapshot(server)

    with pytest.raises(InvalidMessageError, match="client 0 request 0: a forward with this id is already pending"):
        server.forward(_header(0), Crossing(*_inputs(seed=1)))

    _assert_unchanged_but_rejected(server, before)


def test_backward_with_a_malformed_header_is_rejected(server: MiddleServer) -> None:
    server.forward(_header(0), Crossing(*_inputs()))
    before = _snapshot(server)

    with pytest.raises(InvalidMessageError, match="expected a RequestHeader, got tuple"):
        server.backward((0, 0), torch.ones(2, 5, HIDDEN))

    _assert_unchanged_but_rejected(server, before)


# ----------------------------------------------------------------------- request state


def test_forward_state_is_kept_until_its_backward(server: MiddleServer) -> None:
    hidden, mask, pos = _inputs()

    out = server.forward(_header(0), Crossing(hidden, mask, pos))
    assert server.pending_count() == 1
    assert out.shape == hidden.shape and not out.requires_grad
    assert all(p.grad is None for p in server.middle.parameters())

    grad_in = server.backward(_header(0), torch.ones_like(out))

    assert server.pending_count() == 0
    assert grad_in.shape == hidden.shape and torch.isfinite(grad_in).all() and grad_in.abs().sum() > 0
    assert all(p.grad is not None for p in server.middle.parameters())
    with pytest.raises(InvalidMessageError, match="no pending forward"):
        server.backward(_header(0), torch.ones_like(out))


def test_infer_keeps_nothing_and_matches_forward(server: MiddleServer) -> None:
    hidden, mask, pos = _inputs()

    inferred = server.infer(_header(0), Crossing(hidden, mask, pos))

    assert server.pending_count() == 0
    assert all(p.grad is None for p in server.middle.parameters())
    trained = server.forward(_header(1), Crossing(hidden, mask, pos))
    torch.testing.assert_close(inferred, trained, atol=1e-6, rtol=0.0)
    with pytest.raises(InvalidMessageError, match="no pending forward"):
        server.backward(_header(0), torch.ones_like(inferred))


def test_too_many_forwards_without_backward_evict_the_oldest(make_server: Callable[..., MiddleServer]) -> None:
    server = make_server("server.max_pending_per_client=2")
    for request_id in range(3):
        server.forward(_header(request_id), Crossing(*_inputs(seed=request_id)))

    assert server.pending_count() == 2
    assert server.stats.evicted == 1
    with pytest.raises(InvalidMessageError, match="request 0: no pending forward"):
        server.backward(_header(0), torch.ones(2, 5, HIDDEN))
    for request_id in (1, 2):
        server.backward(_header(request_id), torch.ones(2, 5, HIDDEN))
    assert server.pending_count() == 0


def test_stale_state_is_swept(make_server: Callable[..., MiddleServer]) -> None:
    server = make_server("server.state_timeout_s=0.05")
    server.forward(_header(0), Crossing(*_inputs()))
    time.sleep(0.15)

    server.forward(_header(1), Crossing(*_inputs()))  # the next forward sweeps what timed out

    assert server.pending_count() == 1
    assert server.stats.evicted == 1
    with pytest.raises(InvalidMessageError, match="request 0: no pending forward"):
        server.backward(_header(0), torch.ones(2, 5, HIDDEN))
    server.backward(_header(1), torch.ones(2, 5, HIDDEN))
    assert server.pending_count() == 0
