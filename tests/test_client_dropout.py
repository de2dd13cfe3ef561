"""A client that dies mid-round is dropped after server.client_timeout_s; the others finish; it can rejoin."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_encrypted_link import _model

from flglm.aggregation.fedavg import AggregationRounds
from flglm.aggregation.secure_rounds import SecureRounds
from flglm.client.server_link import ServerLink
from flglm.config import RunConfig, fingerprint
from flglm.link.messages import InvalidMessageError
from flglm.server.endpoint import ServerEndpoint
from flglm.server.middle_server import MiddleServer


@pytest.fixture
def cfg(tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]) -> RunConfig:
    return make_run_config(tiny_model_configs["llama"], "federation.num_clients=3", "server.client_timeout_s=1.0", "crypto.enabled=false")


def _three_clients(cfg: RunConfig) -> tuple[MiddleServer, ServerEndpoint, list[ServerLink], list[Any]]:
    """A server, its endpoint, and three clients' links, each with its split model (said hello)."""
    server = MiddleServer(cfg)
    endpoint = ServerEndpoint(server)
    links = [ServerLink(endpoint, client_id=i, timeout_s=30) for i in range(3)]
    return server, endpoint, links, [_model(cfg, link) for link in links]


def _step_and_aggregate(lm: Any, link: ServerLink, round_index: int) -> torch.Tensor:
    ids = torch.arange(3, 12).view(1, 9)
    lm(ids, torch.ones_like(ids)).sum().backward()
    link.step(client_step=round_index, total_steps=4)
    return link.aggregate(round_index, torch.full((4,), float(link.client_id)), 1.0)


def test_a_silent_client_is_dropped_and_the_others_finish_their_round(cfg: RunConfig, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: three clients; client 2 sends a forward (taking the server's turn and leaving
    # autograd state behind) and then dies without a word
    server, endpoint, links, models = _three_clients(cfg)
    ids = torch.arange(3, 12).view(1, 9)
    models[2](ids, torch.ones_like(ids))
    assert server.pending_count() == 1
    averages: dict[int, torch.Tensor] = {}

    def survivor(i: int) -> None:
        averages[i] = _step_and_aggregate(models[i], links[i], 0)

    # Execute: clients 0 and 1 train a step and meet for FedAvg round 0
    with caplog.at_level(logging.WARNING, logger="flglm.server"):
        threads = [threading.Thread(target=survivor, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)

    # Assert: they finished without client 2, whose state is freed; the event is logged
    assert not any(t.is_alive() for t in threads), "the survivors are stuck"
    assert torch.equal(averages[0], torch.full((4,), 0.5)) and torch.equal(averages[1], averages[0])
    assert server.pending_count() == 0
    assert server.stats.dropped_clients == 1 and server.stats.steps == 2
    assert "client 2 dropped from the federation: no message for 1s" in caplog.text
    # the dead process's late message is refused by name; a new process of client 2 joins and trains
    with pytest.raises(InvalidMessageError, match="client 2 was dropped .* join again"):
        links[2].step(client_step=0, total_steps=4)
    restarted = ServerLink(endpoint, client_id=2, timeout_s=30)
    lm = _model(cfg, restarted)
    lm(ids, torch.ones_like(ids)).sum().backward()
    restarted.step(client_step=0, total_steps=4)
    assert server.stats.steps == 3
    server.close()


def test_a_client_waiting_for_its_turn_or_a_round_is_not_silent(cfg: RunConfig) -> None:
    # Prepare: client 0 holds a FedAvg round open (waiting for the others) for longer than the timeout
    server, _, links, _ = _three_clients(cfg)
    done: dict[int, torch.Tensor] = {}
    waiting = threading.Thread(target=lambda: done.setdefault(0, links[0].aggregate(0, torch.zeros(4), 1.0)))
    waiting.start()

    # Execute: the others keep talking and join the round after 2.5 timeouts
    for _ in range(5):
        threading.Event().wait(0.5)
        for link in links[1:]:
            link.grad_norms()
    others = [threading.Thread(target=lambda i=i: done.setdefault(i, links[i].aggregate(0, torch.zeros(4), 1.0))) for i in (1, 2)]
    for thread in others:
        thread.start()
    for thread in [waiting, *others]:
        thread.join(timeout=10)

    # Assert: the round completed for all three; nobody was dropped
    assert sorted(done) == [0, 1, 2] and server.stats.dropped_clients == 0
    server.close()


def test_a_restarted_client_joins_the_round_the_others_are_at(cfg: RunConfig) -> None:
    # Prepare: client 2 dies before round 0; clients 0 and 1 finish round 0 without it after its drop
    server, endpoint, links, _ = _three_clients(cfg)
    server.drop_client(2, "test")
    finished = [threading.Thread(target=links[i].aggregate, args=(0, torch.zeros(4), 1.0)) for i in (0, 1)]
    for thread in finished:
        thread.start()
    for thread in finished:
        thread.join(timeout=30)

    # Execute: a new process of client 2 joins; then all three take part in the next round
    restarted = ServerLink(endpoint, client_id=2, timeout_s=30)
    info = restarted.hello(fingerprint(cfg), "tok")
    averages: dict[int, torch.Tensor] = {}
    members = {0: links[0], 1: links[1], 2: restarted}
    rounds = [
        threading.Thread(target=lambda i=i: averages.setdefault(i, members[i].aggregate(info["next_round"], torch.full((4,), float(i)), 1.0)))
        for i in members
    ]
    for thread in rounds:
        thread.start()
    for thread in rounds:
        thread.join(timeout=30)

    # Assert: it was told round 1 (not the finished round 0), and that round held all three
    assert info["next_round"] == 1
    assert sorted(averages) == [0, 1, 2] and torch.equal(averages[2], torch.full((4,), 1.0))
    server.close()


def test_next_round_is_the_oldest_open_round_or_the_one_after_the_last() -> None:
    # Prepare: plain rounds with two members, and secure rounds with two members
    plain, secure = AggregationRounds(), SecureRounds()
    for rounds in (plain, secure):
        rounds.join(0)
        rounds.join(1)

    # Execute / Assert: nothing open -> round 0; round 0 open (one contribution or one begin) -> 0;
    # round 0 done -> 1; secure: round 1 planned without a late joiner -> 2
    assert plain.next_round() == 0 and secure.next_round() == 0
    plain.contribute(0, 0, torch.zeros(4), 1.0)
    secure.begin(0, 0)
    assert plain.next_round() == 0 and secure.next_round() == 0
    plain.contribute(1, 0, torch.zeros(4), 1.0)
    secure.begin(1, 0)
    assert plain.next_round() == 1 and secure.next_round() == 1
    secure.begin(0, 1)
    secure.begin(1, 1)
    assert secure.next_round() == 2
