"""NaN or Inf reaching the server: refused (``server.nonfinite=reject``) or skipped (``skip``),
never applied to the model, always logged or named."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch

from flglm.config import ConfigError, RunConfig
from flglm.link.crossing import Crossing
from flglm.link.messages import InvalidMessageError, RequestHeader
from flglm.server.middle_server import MiddleServer

BATCH, LENGTH, HIDDEN = 2, 5, 64


def _state_hash(server: MiddleServer) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(server.middle.hf.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().numpy().tobytes())
    return digest.hexdigest()


def _inputs(*, nan: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = torch.randn(BATCH, LENGTH, HIDDEN, generator=torch.Generator().manual_seed(0))
    if nan:
        hidden[1, 2, 3] = float("nan")
        hidden[0, 0, 0] = float("inf")
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    pos = torch.arange(LENGTH).expand(BATCH, LENGTH).contiguous()
    return hidden, mask, pos


@pytest.fixture
def make_server(tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]) -> Callable[[str], MiddleServer]:
    servers: list[MiddleServer] = []

    def make(mode: str) -> MiddleServer:
        server = MiddleServer(make_run_config(tiny_model_configs["llama"], f"server.nonfinite={mode}", "crypto.enabled=false"))
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def _step(server: MiddleServer, index: int) -> None:
    server.step(0, index, 10, 1.0, None)


def test_skip_answers_zeros_and_leaves_the_model_untouched(make_server: Callable[[str], MiddleServer], caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    server = make_server("skip")
    before = _state_hash(server)
    hidden, mask, pos = _inputs(nan=True)

    # Execute: a forward with NaN/Inf, its backward, the step
    with caplog.at_level(logging.WARNING, logger="flglm.server"):
        out = server.forward(RequestHeader(0, 0), Crossing(hidden, mask, pos))
        grad_in = server.backward(RequestHeader(0, 0), torch.ones(BATCH, LENGTH, HIDDEN))
        _step(server, 0)

    # Assert: zeros both ways, nothing applied, nothing pending, logged and counted
    assert torch.equal(out, torch.zeros(BATCH, LENGTH, HIDDEN)) and torch.equal(grad_in, torch.zeros(BATCH, LENGTH, HIDDEN))
    assert _state_hash(server) == before
    assert server.pending_count() == 0 and server.stats.skipped_nonfinite == 1 and server.stats.rejected == 0
    assert "hidden states contain NaN or Inf: skipped (server.nonfinite=skip)" in caplog.text


def test_skip_drops_a_nonfinite_gradient_and_training_goes_on(make_server: Callable[[str], MiddleServer], caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: a clean forward whose gradient comes back with NaN
    server = make_server("skip")
    before = _state_hash(server)
    hidden, mask, pos = _inputs()
    server.forward(RequestHeader(0, 0), Crossing(hidden, mask, pos))
    bad = torch.ones(BATCH, LENGTH, HIDDEN)
    bad[0, 1, 2] = float("nan")

    # Execute
    with caplog.at_level(logging.WARNING, logger="flglm.server"):
        grad_in = server.backward(RequestHeader(0, 0), bad)
        _step(server, 0)

    # Assert: not applied; the next clean step trains as usual
    assert torch.equal(grad_in, torch.zeros(BATCH, LENGTH, HIDDEN)) and _state_hash(server) == before
    assert "gradient contain NaN or Inf: skipped" in caplog.text and server.pending_count() == 0
    server.forward(RequestHeader(0, 1), Crossing(hidden, mask, pos))
    assert torch.isfinite(server.backward(RequestHeader(0, 1), torch.ones(BATCH, LENGTH, HIDDEN))).all()
    _step(server, 1)
    assert _state_hash(server) != before


def test_reject_refuses_by_name_and_changes_nothing(make_server: Callable[[str], MiddleServer]) -> None:
    server = make_server("reject")
    before = _state_hash(server)
    hidden, mask, pos = _inputs(nan=True)

    with pytest.raises(InvalidMessageError, match="hidden states contain NaN or Inf"):
        server.forward(RequestHeader(0, 0), Crossing(hidden, mask, pos))
    clean, _, _ = _inputs()
    server.forward(RequestHeader(0, 1), Crossing(clean, mask, pos))
    with pytest.raises(InvalidMessageError, match="gradient contains NaN or Inf"):
        server.backward(RequestHeader(0, 1), torch.full((BATCH, LENGTH, HIDDEN), float("inf")))

    assert _state_hash(server) == before and server.stats.rejected == 2 and server.stats.skipped_nonfinite == 0


def test_skip_still_refuses_malformed_input_and_nonfinite_decoding(make_server: Callable[[str], MiddleServer]) -> None:
    server = make_server("skip")
    hidden, mask, pos = _inputs(nan=True)
    with pytest.raises(InvalidMessageError, match="hidden states must be"):
        server.forward(RequestHeader(0, 0), Crossing(hidden[..., :10], mask, pos))  # wrong width: refused, not skipped
    with pytest.raises(InvalidMessageError, match="decoding step contain NaN or Inf"):
        server.decode(RequestHeader(0, 1), 0, 0, Crossing(hidden, mask, pos))
    assert server.stats.skipped_nonfinite == 0


def test_skip_with_client_batching_is_a_config_error(tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]) -> None:
    with pytest.raises(ConfigError, match="server.nonfinite=skip does not work with server.parallelism=client_batching"):
        make_run_config(tiny_model_configs["llama"], "server.nonfinite=skip", "server.parallelism=client_batching")
    with pytest.raises(ConfigError, match="server.nonfinite='drop' is not one of"):
        make_run_config(tiny_model_configs["llama"], "server.nonfinite=drop")
