"""Client-batching: a group of clients' requests run as one batch, each client gets its own rows."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from flglm.config import RunConfig, fingerprint
from flglm.link.crossing import Crossing
from flglm.link.messages import InvalidMessageError, RequestHeader
from flglm.models.prefix import kv_shape
from flglm.server.middle_server import MiddleServer

HIDDEN = 64


def _request(client: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + client)
    hidden = torch.randn(batch, length, HIDDEN, generator=gen)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[-1, length // 2 :] = 0  # each client's own padding too
    pos = torch.arange(length).unsqueeze(0)
    grad = torch.randn(batch, length, HIDDEN, generator=gen)
    return hidden, mask, pos, grad


def _threads(jobs: list[Callable[[], Any]], timeout: float = 60) -> list[Any]:
    results: list[Any] = [None] * len(jobs)

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a client is stuck"
    return results


@pytest.fixture
def make(tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]) -> Callable[..., MiddleServer]:
    def build(*overrides: str) -> MiddleServer:
        server = MiddleServer(make_run_config(tiny_model_configs["llama"], "federation.num_clients=3", *overrides))
        for client in range(server.cfg.federation.num_clients):
            server.hello(client, fingerprint(server.cfg), "tok")
        return server

    return build


def _grads(server: MiddleServer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in server.middle.hf.named_parameters() if p.grad is not None}


def test_batched_outputs_and_input_gradients_equal_serving_each_client_alone(make: Callable[..., MiddleServer]) -> None:
    # Prepare: three clients with different batch sizes and sequence lengths
    shapes = {0: (2, 5), 1: (3, 9), 2: (1, 7)}
    requests = {c: _request(c, *shape) for c, shape in shapes.items()}
    batched = make("server.parallelism=client_batching", "server.batch_window_ms=5000")

    def client(c: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, mask, pos, grad = requests[c]
        header = RequestHeader(client_id=c, request_id=0)
        out = batched.forward(header, Crossing(hidden, mask, pos)).wait()
        grad_in = batched.backward(header, grad).wait()
        return out, grad_in

    # Execute
    results = dict(enumerate(_threads([lambda c=c: client(c) for c in shapes])))
    batched_grads = _grads(batched)

    # Assert: each client's rows equal what a sequential server computes for it alone
    total = sum(b for b, _ in shapes.values())
    expected_grads: dict[str, torch.Tensor] = {}
    for c, (hidden, mask, pos, grad) in requests.items():
        alone = make()
        header = RequestHeader(client_id=c, request_id=0)
        out = alone.forward(header, Crossing(hidden, mask, pos))
        grad_in = alone.backward(header, grad)
        torch.testing.assert_close(results[c][0], out, atol=1e-5, rtol=0)
        torch.testing.assert_close(results[c][1], grad_in, atol=1e-5, rtol=0)
        for name, g in _grads(alone).items():  # the group's loss: sample-weighted mean of the members'
            expected_grads[name] = expected_grads.get(name, 0) + g * (shapes[c][0] / total)
    for name, g in expected_grads.items():
        torch.testing.assert_close(batched_grads[name], g, atol=1e-5, rtol=0, msg=name)
    assert batched.summary()["server"]["forwards"] == 3 and batched.pending_count() == 0


def test_p_tuning_prefixes_ride_along_each_row_with_its_own_clients_prefixes(make: Callable[..., MiddleServer]) -> None:
    # Prepare: P-tuning v2, three clients with their own prefixes, batch sizes and lengths
    shapes = {0: (2, 5), 1: (3, 9), 2: (1, 7)}
    requests = {c: _request(c, *shape) for c, shape in shapes.items()}
    probe = make("peft.method=ptuning_v2", "peft.prefix_length=3")
    kv_heads, head_dim = kv_shape(probe.middle.hf.config)
    layers = len(probe.middle.plan.middle)
    prefixes = {c: torch.randn(layers, 2, kv_heads, 3, head_dim, generator=torch.Generator().manual_seed(7 + c)) for c in shapes}
    batched = make("peft.method=ptuning_v2", "peft.prefix_length=3", "server.parallelism=client_batching", "server.batch_window_ms=5000")

    def client(c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden, mask, pos, grad = requests[c]
        header = RequestHeader(client_id=c, request_id=0)
        out = batched.forward(header, Crossing(hidden, mask, pos, prefixes[c])).wait()
        grad_in, grad_prefix = batched.backward(header, grad).wait()
        return out, grad_in, grad_prefix

    # Execute
    results = dict(enumerate(_threads([lambda c=c: client(c) for c in shapes])))

    # Assert: outputs, input and prefix gradients equal serving each client alone
    assert batched.summary()["server"]["groups"] == 0 and batched.summary()["server"]["mean_group_size"] == 3.0
    for c, (hidden, mask, pos, grad) in requests.items():
        assert not isinstance(results[c], BaseException), results[c]
        alone = make("peft.method=ptuning_v2", "peft.prefix_length=3")
        header = RequestHeader(client_id=c, request_id=0)
        out = alone.forward(header, Crossing(hidden, mask, pos, prefixes[c]))
        grad_in, grad_prefix = alone.backward(header, grad)
        torch.testing.assert_close(results[c][0], out, atol=1e-5, rtol=0)
        torch.testing.assert_close(results[c][1], grad_in, atol=1e-5, rtol=0)
        torch.testing.assert_close(results[c][2], grad_prefix, atol=1e-5, rtol=0)
        assert grad_prefix.abs().sum() > 0
    # the prefixes changed what the middle computed: without them the outputs differ
    hidden, mask, pos, _ = requests[0]
    plain = make().forward(RequestHeader(client_id=0, request_id=0), Crossing(hidden, mask, pos))
    assert not torch.allclose(plain, results[0][0], atol=1e-3)
    batched.close()


def test_a_batch_group_refuses_members_with_and_without_prefixes(make: Callable[..., MiddleServer]) -> None:
    # Prepare
    server = make("peft.method=ptuning_v2", "peft.prefix_length=3", "server.parallelism=client_batching", "server.batch_window_ms=5000")
    kv_heads, head_dim = kv_shape(server.middle.hf.config)
    layers = len(server.middle.plan.middle)

    def client(c: int) -> object:
        hidden, mask, pos, _ = _request(c, 2, 6)
        prefix = torch.randn(layers, 2, kv_heads, 3, head_dim) if c != 1 else None
        return server.forward(RequestHeader(client_id=c, request_id=0), Crossing(hidden, mask, pos, prefix)).wait()

    # Execute
    results = _threads([lambda c=c: client(c) for c in range(3)])
    # Assert: every member hears why, naming the client without prefixes
    assert all(isinstance(r, Exception) and "clients [1] sent no P-tuning prefixes" in str(r) for r in results), results
    server.close()


def test_one_optimizer_step_per_group(make: Callable[..., MiddleServer]) -> None:
    # Prepare
    server = make("server.parallelism=client_batching", "server.batch_window_ms=5000")
    before = {n: p.detach().clone() for n, p in server.middle.hf.named_parameters()}

    def client(c: int) -> None:
        hidden, mask, pos, grad = _request(c, 2, 6)
        header = RequestHeader(client_id=c, request_id=0)
        server.forward(header, Crossing(hidden, mask, pos)).wait()
        server.backward(header, grad).wait()
        server.step(c, 0, 10).wait()

    # Execute
    errors = [r for r in _threads([lambda c=c: client(c) for c in range(3)]) if r is not None]
    # Assert
    assert not errors, errors
    summary = server.summary()["server"]
    assert summary["steps"] == 1 and summary["groups"] == 1 and summary["mean_group_size"] == 3.0
    assert any(not torch.equal(before[n], p) for n, p in server.middle.hf.named_parameters())


def test_a_client_that_stops_inside_a_group_does_not_stop_the_others(make: Callable[..., MiddleServer]) -> None:
    # Prepare: client 2 sends its forward, then never its backward (it died)
    server = make("server.parallelism=client_batching", "server.batch_window_ms=5000", "server.request_timeout_s=0.5")

    def client(c: int) -> str:
        hidden, mask, pos, grad = _request(c, 2, 6)
        header = RequestHeader(client_id=c, request_id=0)
        server.forward(header, Crossing(hidden, mask, pos)).wait()
        if c == 2:
            return "died"
        server.backward(header, grad).wait()
        server.step(c, 0, 10).wait()
        # a second step: the group goes on without client 2
        header = RequestHeader(client_id=c, request_id=1)
        server.forward(header, Crossing(hidden, mask, pos)).wait()
        server.backward(header, grad).wait()
        server.step(c, 1, 10).wait()
        return "ok"

    # Execute
    results = _threads([lambda c=c: client(c) for c in range(3)])
    # Assert
    assert results == ["ok", "ok", "died"]
    summary = server.summary()["server"]
    assert summary["dropped_members"] == 1 and summary["steps"] == 2
    with pytest.raises(InvalidMessageError, match="no pending forward"):
        server.backward(RequestHeader(client_id=2, request_id=0), torch.zeros(2, 6, HIDDEN))


def test_clients_queued_behind_a_running_group_form_the_next_group_together(make: Callable[..., MiddleServer]) -> None:
    # Prepare: a short window; clients 0 and 1 send their next forward while the first group
    # is still running, at slightly different times
    server = make("server.parallelism=client_batching", "server.batch_window_ms=300", "federation.num_clients=2")

    def client(c: int) -> None:
        for step in range(3):
            hidden, mask, pos, grad = _request(c, 2, 6)
            header = RequestHeader(client_id=c, request_id=step)
            server.forward(header, Crossing(hidden, mask, pos)).wait()
            server.backward(header, grad).wait()
            server.step(c, step, 10).wait()

    # Execute
    errors = [r for r in _threads([lambda c=c: client(c) for c in range(2)]) if r is not None]
    # Assert: every group had both clients
    assert not errors, errors
    summary = server.summary()["server"]
    assert summary["groups"] == 3 and summary["mean_group_size"] == 2.0
