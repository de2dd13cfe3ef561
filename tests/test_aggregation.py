"""Tests for flglm.aggregation.fedavg: the pure FedAvg and the server's rounds."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.futures import Future

from flglm.aggregation.fedavg import AggregationRounds, fedavg

FAST = settings(max_examples=100, deadline=None)


@st.composite
def _contributions(draw: st.DrawFn) -> tuple[list[list[float]], list[float]]:
    size = draw(st.integers(1, 8))
    count = draw(st.integers(1, 6))
    entry = st.floats(-1e3, 1e3, allow_nan=False)
    vectors = [draw(st.lists(entry, min_size=size, max_size=size)) for _ in range(count)]
    weights = draw(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=count, max_size=count))
    return vectors, weights


@FAST
@given(_contributions())
@example(([[1.5]], [5e-324]))  # a subnormal weight: the case CI found
def test_fedavg_is_the_weighted_mean(contributions: tuple[list[list[float]], list[float]]) -> None:
    vectors, weights = contributions
    tensors = [torch.tensor(v, dtype=torch.float64) for v in vectors]
    total = sum(weights)

    average = fedavg(tensors, weights)

    if total > 0:
        # Each weight's share first: w * v / total underflows for subnormal weights (5e-324 * 1.5
        # rounds to 5e-324), the share w / total does not.
        expected = [sum((w / total) * v[i] for v, w in zip(vectors, weights)) for i in range(len(vectors[0]))]
    else:
        expected = [sum(v[i] for v in vectors) / len(vectors) for i in range(len(vectors[0]))]
    assert average.dtype == torch.float64 and average.shape == tensors[0].shape
    torch.testing.assert_close(average, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-9)
    assert (average >= torch.stack(tensors).min(0).values - 1e-6).all()
    assert (average <= torch.stack(tensors).max(0).values + 1e-6).all()


def test_fedavg_keeps_dtype_and_shape() -> None:
    vectors = [torch.ones(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3, dtype=torch.bfloat16)]

    average = fedavg(vectors, [1.0, 3.0])

    assert average.dtype == torch.bfloat16 and average.shape == (2, 3)
    assert torch.equal(average, torch.full((2, 3), 0.25, dtype=torch.bfloat16))


def test_fedavg_with_all_zero_weights_is_the_plain_mean() -> None:
    average = fedavg([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])], [0.0, 0.0])

    assert torch.equal(average, torch.tensor([2.0, 4.0]))


def test_fedavg_zero_weight_contribution_is_ignored() -> None:
    average = fedavg([torch.tensor([1.0, 2.0]), torch.tensor([100.0, 100.0])], [2.0, 0.0])

    assert torch.equal(average, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize(
    ("vectors", "weights", "expected"),
    [
        ([], [], "at least one"),
        ([torch.ones(2)], [1.0, 2.0], "1 vectors but 2 weights"),
        ([torch.ones(2), torch.ones(2)], [1.0, -1.0], "weights must be finite and >= 0"),
        ([torch.ones(2), torch.ones(2)], [1.0, float("nan")], "weights must be finite and >= 0"),
        ([torch.ones(2), torch.ones(2)], [1.0, float("inf")], "weights must be finite and >= 0"),
        ([torch.ones(3), torch.ones(1)], [1.0, 1.0], r"equally shaped .*\[1\].*\[3\]"),
        ([torch.ones(2, 3), torch.ones(3, 2)], [1.0, 1.0], "equally shaped"),
    ],
    ids=["empty", "count-mismatch", "negative", "nan-weight", "inf-weight", "broadcastable-shapes", "transposed"],
)
def test_fedavg_rejects_bad_input(vectors: list[torch.Tensor], weights: list[float], expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        fedavg(vectors, weights)


# ------------------------------------------------------------------- AggregationRounds


def _rounds(*clients: int) -> AggregationRounds:
    rounds = AggregationRounds()
    for client in clients:
        rounds.join(client)
    return rounds


def test_round_completes_when_every_client_contributed() -> None:
    rounds = _rounds(0, 1)

    first = rounds.contribute(0, 0, torch.tensor([1.0, 2.0]), 1.0)
    assert not first.done()
    second = rounds.contribute(1, 0, torch.tensor([5.0, 10.0]), 3.0)

    assert first.done() and second.done()
    assert torch.equal(first.wait(), torch.tensor([4.0, 8.0]))
    assert torch.equal(second.wait(), torch.tensor([4.0, 8.0]))
    assert rounds.completed == 1


def test_rounds_are_independent() -> None:
    rounds = _rounds(0, 1)

    early = rounds.contribute(0, 1, torch.tensor([2.0]), 1.0)  # client 0 is a round ahead
    late = [rounds.contribute(0, 0, torch.tensor([0.0]), 1.0), rounds.contribute(1, 0, torch.tensor([4.0]), 1.0)]

    assert all(f.done() for f in late) and not early.done()
    assert torch.equal(late[0].wait(), torch.tensor([2.0]))
    rounds.contribute(1, 1, torch.tensor([4.0]), 1.0)
    assert torch.equal(early.wait(), torch.tensor([3.0]))
    assert rounds.completed == 2


def test_leaving_client_unblocks_a_round_waiting_on_it() -> None:
    rounds = _rounds(0, 1, 2)
    waiting = [rounds.contribute(0, 0, torch.tensor([1.0]), 1.0), rounds.contribute(1, 0, torch.tensor([3.0]), 1.0)]
    results: list[torch.Tensor] = []
    waiter = threading.Thread(target=lambda: results.append(waiting[0].wait()), daemon=True)
    waiter.start()

    rounds.leave(2)
    waiter.join(timeout=10)

    assert not waiter.is_alive(), "the round still waits for the client that left"
    assert torch.equal(results[0], torch.tensor([2.0]))
    assert torch.equal(waiting[1].wait(), torch.tensor([2.0]))


def test_a_left_client_is_not_waited_for_later() -> None:
    rounds = _rounds(0, 1)
    rounds.leave(1)

    alone = rounds.contribute(0, 0, torch.tensor([7.0]), 1.0)

    assert alone.done() and torch.equal(alone.wait(), torch.tensor([7.0]))
    with pytest.raises(ValueError, match="client 1 is not an active member"):
        rounds.contribute(1, 1, torch.tensor([7.0]), 1.0)


def test_size_mismatch_is_rejected_and_the_round_still_completes() -> None:
    rounds = _rounds(0, 1)
    first = rounds.contribute(0, 0, torch.zeros(3), 1.0)

    with pytest.raises(ValueError, match="client 1: aggregation vector has 4 entries, expected 3"):
        rounds.contribute(1, 0, torch.zeros(4), 1.0)

    assert not first.done()
    rounds.contribute(1, 0, torch.full((3,), 2.0), 1.0)
    assert torch.equal(first.wait(), torch.ones(3))


@pytest.mark.parametrize(
    ("client", "vector", "weight", "expected"),
    [
        (0, torch.zeros(2, 2), 1.0, "1-D float tensor"),
        (0, torch.zeros(3, dtype=torch.long), 1.0, "1-D float tensor"),
        (0, torch.zeros(3), -1.0, "weight must be finite and >= 0"),
        (0, torch.zeros(3), float("nan"), "weight must be finite and >= 0"),
        (7, torch.zeros(3), 1.0, "client 7 is not an active member"),
    ],
    ids=["2-d", "integer", "negative-weight", "nan-weight", "not-joined"],
)
def test_bad_contribution_is_rejected_without_touching_the_round(
    client: int, vector: torch.Tensor, weight: float, expected: str
) -> None:
    rounds = _rounds(0, 1)

    with pytest.raises(ValueError, match=expected):
        rounds.contribute(client, 0, vector, weight)

    # Client 0 can still contribute to round 0, and the round completes as usual.
    futures = [rounds.contribute(0, 0, torch.zeros(3), 1.0), rounds.contribute(1, 0, torch.ones(3), 1.0)]
    assert all(torch.equal(f.wait(), torch.full((3,), 0.5)) for f in futures)


def test_contributing_twice_to_a_round_is_rejected() -> None:
    rounds = _rounds(0, 1)
    rounds.contribute(0, 0, torch.zeros(3), 1.0)

    with pytest.raises(ValueError, match="client 0 already contributed to round 0"):
        rounds.contribute(0, 0, torch.zeros(3), 1.0)


def test_a_combine_hook_answers_the_round_with_its_own_average() -> None:
    # Hierarchical serving: a completed local round is handed on; its answer comes later.
    handed: list[tuple[int, list[torch.Tensor], list[float]]] = []
    pending: Future = Future()

    def combine(round_index: int, vectors: list[torch.Tensor], weights: list[float]) -> Future:
        handed.append((round_index, vectors, weights))
        return pending

    rounds = AggregationRounds(combine=combine)
    for client in (0, 1):
        rounds.join(client)
    futures = [rounds.contribute(1, 3, torch.tensor([2.0]), 2.0), rounds.contribute(0, 3, torch.tensor([1.0]), 1.0)]

    assert [(r, [v.item() for v in vs], ws) for r, vs, ws in handed] == [(3, [1.0, 2.0], [1.0, 2.0])]  # by client id
    assert not any(f.done() for f in futures)
    pending.set_result(torch.tensor([7.0]))
    assert all(torch.equal(f.wait(), torch.tensor([7.0])) for f in futures)


def test_a_failed_combine_reaches_every_contributor() -> None:
    failed: Future = Future()
    rounds = AggregationRounds(combine=lambda *_: failed)
    rounds.join(0)
    future = rounds.contribute(0, 0, torch.tensor([1.0]), 1.0)

    failed.set_exception(RuntimeError("peer sub-server died"))

    with pytest.raises(RuntimeError, match="peer sub-server died"):
        future.wait()
