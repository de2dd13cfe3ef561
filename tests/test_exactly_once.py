"""Lost and duplicated messages change nothing: resent messages are answered from the server's record.

In-process tests drive a client through ``FaultyTransport`` (deterministic by seed) and compare
with a clean run bit for bit; the federation test does the same through torchrun and real RPC.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_encrypted_link import _client_session, _model, _sessions, _train
from test_federation import merged_weights

from flglm.client.server_link import ServerLink
from flglm.config import RunConfig, fingerprint
from flglm.crypto.keyring import generate_key_set
from flglm.jobs.edge_processes import run_edge_federation
from flglm.jobs.subprocesses import run_federation
from flglm.link.messages import InvalidMessageError
from flglm.link.transport import FaultyTransport, LocalTransport, RetryPolicy, TransportError
from flglm.server.endpoint import ServerEndpoint
from flglm.server.middle_server import MiddleServer

NO_WAIT = RetryPolicy(max_retries=12, backoff_s=0.0)


@pytest.fixture
def cfg(tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]) -> RunConfig:
    return make_run_config(tiny_model_configs["llama"], "federation.num_clients=2")


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    generate_key_set(tmp_path / "keys", num_clients=2)
    return tmp_path / "keys"


def _run(cfg: RunConfig, keys: Path, *, encrypted: bool, faults: dict[str, float] | None, steps: int = 8) -> dict[str, Any]:
    """Train client 0 for ``steps`` steps, evaluate, generate and leave, through a (faulty) link."""
    server = MiddleServer(cfg)
    endpoint = ServerEndpoint(server, _sessions(keys) if encrypted else None)
    transport: Any = LocalTransport(endpoint)
    if faults is not None:
        transport = FaultyTransport(transport, seed=11, **faults)
    link = ServerLink(transport, client_id=0, timeout_s=30, session=_client_session(keys) if encrypted else None, retry=NO_WAIT)
    try:
        lm = _model(cfg, link)
        losses = _train(lm, link, cfg, steps=steps)
        with torch.no_grad():
            evaluated = lm(torch.arange(3, 12).view(1, 9), torch.ones(1, 9, dtype=torch.long))
        state = lm.open_decoding()
        ids = torch.arange(3, 9).view(2, 3)
        decoded = lm.decode(state, ids, torch.ones(2, 3, dtype=torch.long), torch.arange(3).expand(2, 3))
        decoded_next = lm.decode(state, ids[:, :1], torch.ones(2, 4, dtype=torch.long), torch.full((2, 1), 3))
        lm.close_decoding(state)
        link.leave({"loss": losses[-1]})
        return {
            "losses": losses,
            "client": {n: p.detach().clone() for n, p in lm.named_parameters()},
            "server": {n: p.detach().clone() for n, p in server.middle.hf.named_parameters()},
            "outputs": [evaluated, decoded, decoded_next],
            "stats": server.stats.as_dict(),
            "pending": server.pending_count(),
            "decode_sessions": server.decode_sessions(),
            "record": endpoint.record.stats,
            "faults": getattr(transport, "counts", None),
            "resent": link.retries,
        }
    finally:
        server.close()


@pytest.mark.parametrize("encrypted", [False, True], ids=["clear", "sealed"])
def test_lost_and_duplicated_messages_change_nothing(cfg: RunConfig, keys: Path, encrypted: bool) -> None:
    # Prepare: the same run clean and through a link that loses requests, loses answers and
    # delivers requests twice (15% each, seeded)
    faults = {"drop_request": 0.15, "drop_reply": 0.15, "duplicate": 0.15}

    # Execute
    clean = _run(cfg, keys, encrypted=encrypted, faults=None)
    faulty = _run(cfg, keys, encrypted=encrypted, faults=faults)

    # Assert: faults did happen, every kind was resent or duplicated, and the results are identical
    counts = faulty["faults"]
    assert counts.dropped_requests > 0 and counts.dropped_replies > 0 and counts.duplicated > 0
    assert faulty["resent"] == counts.dropped_requests + counts.dropped_replies
    if not encrypted:  # sealed copies are refused as replays before they reach the record
        assert faulty["record"].duplicates > 0
    assert faulty["losses"] == clean["losses"]
    for side in ("client", "server"):
        for name, value in clean[side].items():
            assert torch.equal(faulty[side][name], value), (side, name)
    for a, b in zip(faulty["outputs"], clean["outputs"]):
        assert torch.equal(a, b)
    # nothing applied twice, nothing left behind
    for key in ("forwards", "backwards", "steps", "decodes"):
        assert faulty["stats"][key] == clean["stats"][key], key
    assert faulty["stats"]["steps"] == 8
    assert faulty["pending"] == 0 and faulty["decode_sessions"] == 0


def test_a_resent_step_is_applied_once_and_a_late_copy_is_refused(cfg: RunConfig) -> None:
    # Prepare: one forward/backward of client 0 in the clear, straight at the endpoint
    server = MiddleServer(cfg)
    endpoint = ServerEndpoint(server)
    link = ServerLink(endpoint, client_id=0, timeout_s=30)
    lm = _model(cfg, link)
    ids = torch.arange(3, 12).view(1, 9)
    lm(ids, torch.ones_like(ids)).sum().backward()
    step = [torch.tensor([0.0, 4.0, 1.0, float("nan")], dtype=torch.float64)]

    # Execute: the step three times (a resend and a duplicate), then a copy of the old backward
    for _ in range(3):
        endpoint.exchange(0, "step", 0, 0, step).wait()
    weights = [p.detach().clone() for p in server.params]
    with pytest.raises(InvalidMessageError, match="was answered before; a late copy is ignored"):
        endpoint.exchange(0, "backward", 0, 0, [torch.ones(1, 9, 64)]).wait()

    # Assert: one optimizer step; the late copy changed nothing
    assert server.stats.steps == 1 and server.stats.backwards == 1
    assert endpoint.record.stats.duplicates == 2 and endpoint.record.stats.stale == 1
    assert all(torch.equal(p, w) for p, w in zip(server.params, weights))
    server.close()


def test_a_restarted_client_replaces_its_dead_process(cfg: RunConfig) -> None:
    # Prepare: client 0 sent a forward, then its process died
    server = MiddleServer(cfg)
    endpoint = ServerEndpoint(server)
    old = ServerLink(endpoint, client_id=0, timeout_s=30)
    lm = _model(cfg, old)
    ids = torch.arange(3, 12).view(1, 9)
    lm(ids, torch.ones_like(ids))
    assert server.pending_count() == 1

    # Execute: a resent join of the same process, then a new process of client 0
    again = old.hello(fingerprint(cfg), "tok")
    new = ServerLink(endpoint, client_id=0, timeout_s=30)
    new_lm = _model(cfg, new)

    # Assert: the resend changed nothing; the new process starts clean and can train
    assert again["hidden_size"] == 64 and server.pending_count() == 0
    new_lm(ids, torch.ones_like(ids)).sum().backward()
    new.step(client_step=0, total_steps=1)
    assert server.stats.steps == 1
    server.close()


def test_a_link_gives_up_after_its_retries_naming_the_message(cfg: RunConfig) -> None:
    # Prepare: a transport that loses everything
    class Dead:
        def call(self, method: str, *args: Any) -> Any:
            raise TransportError("connection refused")

    link = ServerLink(Dead(), client_id=0, timeout_s=1, retry=RetryPolicy(max_retries=2, backoff_s=0.0))

    # Execute / Assert
    with pytest.raises(TransportError, match="client 0: join failed after 3 attempts: connection refused"):
        link.hello(fingerprint(cfg), "tok")
    assert link.retries == 2


@pytest.mark.multiprocess
@pytest.mark.parametrize("transport", ["rpc", "socket"])
def test_a_federation_through_a_lossy_network_ends_as_a_clean_one(finished_one_client_run: tuple[Path, Path], tmp_path: Path, transport: str) -> None:
    # Prepare: the session's clean run (one encrypted client, 3 epochs: a re-key handshake each),
    # and the same federation with 10% of messages lost, 10% of answers lost and 10% delivered
    # twice, over torch RPC (torchrun) or the socket link (its own processes), resending quickly
    faults = {"drop_request": 0.1, "drop_reply": 0.1, "duplicate": 0.1, "seed": 5}
    config, clean_dir = finished_one_client_run
    overrides = [*(f"faults.{k}={v}" for k, v in faults.items()), "federation.retry_backoff_s=0.01", "federation.max_retries=10"]

    # Execute
    # (the socket link's server runs one thread, as under torchrun: another count would round differently)
    launch = run_federation if transport == "rpc" else run_edge_federation
    launch(config, overrides, num_clients=1, run_dir=tmp_path / "lossy", timeout_s=240)

    # Assert: same losses and weights as the clean run (over either link); messages were resent and copies answered from the record
    clean = json.loads((clean_dir / "client0" / "metrics.json").read_text())
    lossy = json.loads((tmp_path / "lossy" / "client0" / "metrics.json").read_text())
    assert lossy["losses"] == clean["losses"]
    clean_weights, lossy_weights = merged_weights(clean_dir), merged_weights(tmp_path / "lossy")
    for name, value in clean_weights.items():
        assert torch.equal(lossy_weights[name], value), name
    assert lossy["metrics"]["resent_messages"] > 0 and clean["metrics"]["resent_messages"] == 0
    summary = json.loads((tmp_path / "lossy" / "summary.json").read_text())
    assert summary["server"]["steps"] == 24
