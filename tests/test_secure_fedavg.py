"""The FedAvg callback over secure aggregation, with real links to one server, clients on threads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flglm.aggregation.fedavg import fedavg
from flglm.aggregation.masking import PairwiseMasker
from flglm.callbacks import FedAvgCallback
from flglm.client.server_link import ServerLink
from flglm.config import RunConfig, fingerprint
from flglm.crypto.keyring import generate_key_set, load_client_keys
from flglm.server.endpoint import ServerEndpoint
from flglm.server.middle_server import MiddleServer


def _federation(tmp_path: Path, cfg: RunConfig, n: int) -> tuple[MiddleServer, list[ServerLink], list[FedAvgCallback]]:
    generate_key_set(tmp_path / "keys", n)
    server = MiddleServer(cfg)
    endpoint = ServerEndpoint(server)
    links, callbacks = [], []
    for i in range(n):
        keys = load_client_keys(tmp_path / "keys", i, n)
        link = ServerLink(endpoint, client_id=i, timeout_s=30)
        link.hello(fingerprint(cfg), "tok")
        links.append(link)
        callbacks.append(FedAvgCallback(link, masker=PairwiseMasker(i, keys.identity, keys.peer_keys)))
    return server, links, callbacks


def _run(jobs: list[Callable[[], Any]]) -> list[Any]:
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a client is stuck in the aggregation round"
    assert not errors, errors
    return results


def test_secure_fedavg_equals_plain_fedavg(tmp_path: Path, tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]) -> None:
    # Prepare
    cfg = make_run_config(tiny_model_configs["llama"], "federation.num_clients=3")
    server, _, callbacks = _federation(tmp_path, cfg, 3)
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.randn(5000, generator=gen) for _ in range(3)]
    weights = [16.0, 32.0, 8.0]
    # Execute
    averages = _run([lambda i=i: callbacks[i].average(vectors[i], weights[i]) for i in range(3)])
    # Assert
    expected = fedavg(vectors, weights)
    for average in averages:
        torch.testing.assert_close(average, expected, atol=1e-5, rtol=0)
        assert torch.equal(average, averages[0])
    assert server.summary()["server"]["aggregation_rounds"] == 1


def test_a_client_leaving_mid_round_makes_the_round_redo_without_it(
    tmp_path: Path, tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    # Prepare: client 2 begins the round (so it is a planned participant), then leaves without uploading
    cfg = make_run_config(tiny_model_configs["llama"], "federation.num_clients=3")
    _, links, callbacks = _federation(tmp_path, cfg, 3)
    vectors = [torch.full((100,), float(i + 1)) for i in range(3)]

    def leaver() -> None:
        plan = links[2].aggregation_begin(0)
        assert plan.participants == [0, 1, 2] and plan.attempt == 0
        links[2].leave({})

    # Execute
    averages = _run([lambda: callbacks[0].average(vectors[0], 1.0), lambda: callbacks[1].average(vectors[1], 3.0), leaver])
    # Assert: the average of the two that stayed, not corrupted by the missing masks
    expected = fedavg(vectors[:2], [1.0, 3.0])
    torch.testing.assert_close(averages[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(averages[1], expected, atol=1e-5, rtol=0)
    assert callbacks[0].redone_rounds == callbacks[1].redone_rounds == 1


def test_a_lone_client_gets_its_own_vector_back_bit_exactly(
    tmp_path: Path, tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    cfg = make_run_config(tiny_model_configs["llama"], "federation.num_clients=1")
    _, _, callbacks = _federation(tmp_path, cfg, 1)
    vector = torch.randn(300)
    assert torch.equal(callbacks[0].average(vector, 7.0), vector)
