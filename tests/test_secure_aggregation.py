"""Tests for flglm.aggregation.masking: pairwise masks that cancel, and the server's secure rounds."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.futures import Future

from flglm.aggregation.fedavg import fedavg
from flglm.aggregation.masking import (
    ENCODE_BOUND,
    FIXED_POINT_BITS,
    NARROW_BITS,
    decode,
    encode,
    fits_narrow,
    masked_upload,
    pair_mask,
    pairwise_secret,
    unmask_average,
)
from flglm.aggregation.secure_rounds import RoundPlan, RoundResult, SecureRounds
from flglm.crypto.keys import public_key_bytes

FAST = settings(max_examples=40, deadline=None)
TIMEOUT = 10.0

# Fixed keys keep every test deterministic (the statistical ones included).
_KEYS = {i: X25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i in range(8)}


def _result(future: Future) -> Any:
    """``future.wait()`` that fails the test instead of hanging when the server never answers."""
    deadline = time.monotonic() + TIMEOUT
    while not future.done():
        assert time.monotonic() < deadline, f"future not resolved within {TIMEOUT} s"
        time.sleep(0.001)
    return future.wait()


def _secrets(client: int, participants: tuple[int, ...]) -> dict[int, bytes]:
    return {
        peer: pairwise_secret(_KEYS[client], public_key_bytes(_KEYS[peer]), my_id=client, peer_id=peer) for peer in participants if peer != client
    }


def _upload(client: int, plan: RoundPlan, vector: torch.Tensor, weight: float) -> torch.Tensor:
    return masked_upload(
        vector,
        weight,
        client_id=client,
        participants=plan.participants,
        secrets=_secrets(client, plan.participants),
        round_index=plan.round_index,
        attempt=plan.attempt,
        bits=plan.bits,
    )


# ------------------------------------------------------------------- encoding


@FAST
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=16))
def test_encode_decode_round_trip_within_resolution(values: list[float]) -> None:
    vector = torch.tensor(values, dtype=torch.float64)

    encoded = encode(vector)

    assert encoded.dtype == torch.int64
    torch.testing.assert_close(decode(encoded), vector, atol=2.0 ** -(FIXED_POINT_BITS + 1), rtol=0)


@pytest.mark.parametrize("bad", [ENCODE_BOUND, -ENCODE_BOUND * 2, float("inf"), float("nan")])
def test_encode_refuses_values_that_could_overflow(bad: float) -> None:
    with pytest.raises(ValueError, match=r"magnitude .* at index 1 .*outside the secure-aggregation range \|v\| < 2\.68435e\+08"):
        encode(torch.tensor([0.0, bad, 1.0], dtype=torch.float64))


def test_masked_upload_refuses_weighted_values_out_of_range() -> None:
    plan = RoundPlan(0, 0, (0, 1))

    # 1e6 samples * 1e3 = 1e9, beyond 2**28; the weight alone is fine.
    with pytest.raises(ValueError, match=r"client 0: weight \* vector: value of magnitude 1e\+09"):
        _upload(0, plan, torch.tensor([1.0, 1e3]), 1e6)


def test_int64_arithmetic_wraps_at_the_boundary() -> None:
    top = torch.tensor([2**63 - 1], dtype=torch.int64)
    bottom = torch.tensor([-(2**63)], dtype=torch.int64)

    assert int(top + 1) == -(2**63)
    assert int(bottom - 1) == 2**63 - 1
    in_place = top.clone()
    in_place += top
    assert int(in_place) == -2


def test_unmask_average_survives_wrapping_sums() -> None:
    # Masks chosen to overflow int64 in every partial sum; the total must still be exact.
    values = encode(torch.tensor([3.0, 2.0], dtype=torch.float64))  # weight 2, weighted value 3
    big = torch.tensor([2**63 - 5, 2**63 - 7], dtype=torch.int64)
    uploads = [values + big, big.clone(), torch.zeros(2, dtype=torch.int64) - big - big]

    average = unmask_average(uploads, dtype=torch.float64)

    assert average.tolist() == [1.5]


def test_unmask_average_refuses_a_round_without_samples() -> None:
    plan = RoundPlan(0, 0, (0, 1))
    uploads = [_upload(c, plan, torch.ones(3), 0.0) for c in plan.participants]

    with pytest.raises(ValueError, match="no samples were contributed"):
        unmask_average(uploads)


def test_unmask_average_notices_masks_that_do_not_cancel() -> None:
    uploads = [_upload(0, RoundPlan(0, 0, (0, 1)), torch.ones(100), 1.0), _upload(1, RoundPlan(0, 1, (0, 1)), torch.ones(100), 1.0)]

    with pytest.raises(ValueError, match="masks did not cancel"):
        unmask_average(uploads)


# ------------------------------------------------------------------- masks


def test_pairwise_secret_is_symmetric_and_pair_specific() -> None:
    a_b = pairwise_secret(_KEYS[0], public_key_bytes(_KEYS[1]), my_id=0, peer_id=1)
    b_a = pairwise_secret(_KEYS[1], public_key_bytes(_KEYS[0]), my_id=1, peer_id=0)
    a_c = pairwise_secret(_KEYS[0], public_key_bytes(_KEYS[2]), my_id=0, peer_id=2)
    swapped_ids = pairwise_secret(_KEYS[0], public_key_bytes(_KEYS[1]), my_id=5, peer_id=1)

    assert a_b == b_a and len(a_b) == 32
    assert len({a_b, a_c, swapped_ids}) == 3


@pytest.mark.parametrize(
    ("my_id", "peer_id", "public", "expected"),
    [(1, 1, None, "with itself"), (-1, 2, None, "my_id must be in"), (0, 1, b"short", "client 1 has 5 bytes")],
    ids=["same-id", "negative-id", "short-key"],
)
def test_pairwise_secret_rejects_bad_input(my_id: int, peer_id: int, public: bytes | None, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        pairwise_secret(_KEYS[0], public or public_key_bytes(_KEYS[1]), my_id=my_id, peer_id=peer_id)


def test_pair_mask_is_deterministic_and_differs_per_round_and_attempt() -> None:
    secret = bytes(range(32))

    base = pair_mask(secret, round_index=3, attempt=0, numel=1000)
    again = pair_mask(secret, round_index=3, attempt=0, numel=1000)
    others = [
        pair_mask(secret, round_index=4, attempt=0, numel=1000),
        pair_mask(secret, round_index=3, attempt=1, numel=1000),
        pair_mask(bytes(32), round_index=3, attempt=0, numel=1000),
    ]

    assert base.dtype == torch.int64 and base.shape == (1000,)
    assert torch.equal(base, again)
    assert torch.equal(pair_mask(secret, round_index=3, attempt=0, numel=10), base[:10])  # a keystream prefix
    for other in others:
        assert (other != base).float().mean() > 0.99


def test_pair_mask_spans_the_whole_int64_range_quickly() -> None:
    pair_mask(bytes(32), round_index=0, attempt=0, numel=1_000_000)  # warm up the allocator

    start = time.perf_counter()
    mask = pair_mask(bytes(range(32)), round_index=0, attempt=0, numel=1_000_000)
    elapsed = time.perf_counter() - start

    assert elapsed < 0.1, f"a 1M-entry mask took {elapsed * 1e3:.1f} ms"
    # Uniform over 2**64 values: each quarter of the range holds about a quarter of the entries.
    quarters = torch.bucketize(mask, torch.tensor([-(2**62), 0, 2**62]))
    assert (torch.bincount(quarters, minlength=4).double() / mask.numel() - 0.25).abs().max() < 0.005


@pytest.mark.parametrize("clients", [2, 3, 5])
@FAST
@given(data=st.data())
def test_masked_uploads_sum_to_fedavg(clients: int, data: st.DataObject) -> None:
    size = data.draw(st.integers(1, 20))
    entry = st.floats(-100, 100, allow_nan=False)
    vectors = [torch.tensor(data.draw(st.lists(entry, min_size=size, max_size=size)), dtype=torch.float32) for _ in range(clients)]
    weights = data.draw(st.lists(st.floats(0.5, 1e4), min_size=clients, max_size=clients))
    plan = RoundPlan(data.draw(st.integers(0, 1000)), data.draw(st.integers(0, 3)), tuple(range(clients)))

    uploads = [_upload(c, plan, vectors[c], weights[c]) for c in plan.participants]

    assert all(u.dtype == torch.int64 and u.shape == (size + 1,) for u in uploads)
    torch.testing.assert_close(unmask_average(uploads), fedavg(vectors, weights), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("clients", [2, 3, 7])
@FAST
@given(data=st.data())
def test_narrow_uploads_give_the_wide_average_bit_for_bit_in_half_the_bytes(clients: int, data: st.DataObject) -> None:
    # Values drawn right up to the narrow bound, so the 32-bit sum comes close to wrapping.
    size = data.draw(st.integers(1, 20))
    weights = data.draw(st.lists(st.floats(0.01, 2.0 ** (NARROW_BITS - 1 - FIXED_POINT_BITS) / clients * 0.999), min_size=clients, max_size=clients))
    vectors = []
    for weight in weights:
        limit = 2.0 ** (NARROW_BITS - 1 - FIXED_POINT_BITS) / clients / weight * 0.999
        vectors.append(torch.tensor(data.draw(st.lists(st.floats(-limit, limit), min_size=size, max_size=size)), dtype=torch.float32))
    assert all(fits_narrow(v, w, max_participants=clients) for v, w in zip(vectors, weights))
    wide = RoundPlan(data.draw(st.integers(0, 1000)), data.draw(st.integers(0, 3)), tuple(range(clients)))
    narrow = dataclasses.replace(wide, bits=NARROW_BITS)

    wide_uploads = [_upload(c, wide, vectors[c], weights[c]) for c in wide.participants]
    narrow_uploads = [_upload(c, narrow, vectors[c], weights[c]) for c in narrow.participants]

    assert all(u.dtype == torch.int32 and u.shape == (size + 1,) for u in narrow_uploads)
    assert sum(u.nbytes for u in narrow_uploads) * 2 == sum(u.nbytes for u in wide_uploads)
    assert torch.equal(unmask_average(narrow_uploads, bits=NARROW_BITS), unmask_average(wide_uploads))


@pytest.mark.parametrize(
    ("values", "weight", "participants", "fits"),
    [
        ([63.99], 1.0, 2, True),  # 2**7 / 2 clients = 64
        ([64.0], 1.0, 2, False),
        ([-64.0], 1.0, 2, False),
        ([1.0], 64.0, 2, False),  # the weight is encoded too
        ([0.5], 63.0, 2, True),
        ([63.99], 1.0, 3, False),
        ([float("nan")], 1.0, 2, False),
        ([], 1.0, 2, True),
    ],
)
def test_fits_narrow_bounds_every_encoding_by_two_to_the_31_over_the_clients(
    values: list[float], weight: float, participants: int, fits: bool
) -> None:
    assert fits_narrow(torch.tensor(values), weight, max_participants=participants) is fits


def test_a_round_is_narrow_only_if_every_participant_fits_and_a_redo_stays_narrow() -> None:
    mixed = _rounds(0, 1, 2)
    futures = [mixed.begin(0, 0, True), mixed.begin(1, 0, False), mixed.begin(2, 0, True)]
    assert {_result(f) for f in futures} == {RoundPlan(0, 0, (0, 1, 2), 64)}
    rounds = _rounds(0, 1, 2)
    futures = [rounds.begin(c, 0, True) for c in (0, 1, 2)]
    plan = _result(futures[0])
    assert plan == RoundPlan(0, 0, (0, 1, 2), NARROW_BITS)
    vectors = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.25]), torch.tensor([0.0, 0.0])]

    with pytest.raises(ValueError, match="1-D int32 masked_upload of the 32-bit plan, got torch.int64"):
        rounds.upload(0, 0, 0, _upload(0, dataclasses.replace(plan, bits=64), vectors[0], 1.0), 0.0)
    first = rounds.upload(0, 0, 0, _upload(0, plan, vectors[0], 1.0), 0.0)
    rounds.leave(2)
    redo = _result(first).plan
    again = [rounds.upload(c, 0, redo.attempt, _upload(c, redo, vectors[c], 3.0 if c else 1.0), 0.0) for c in redo.participants]

    assert redo == RoundPlan(0, 1, (0, 1), NARROW_BITS)
    torch.testing.assert_close(_result(again[0]).average, fedavg(vectors[:2], [1.0, 3.0]), atol=1e-6, rtol=0)


def test_masks_of_a_pair_are_equal_and_opposite() -> None:
    plan = RoundPlan(7, 2, (0, 1))
    zero = torch.zeros(50)

    low, high = (_upload(c, plan, zero, 0.0) for c in plan.participants)

    assert (low != 0).all()
    assert torch.equal(low, -high)


def test_a_masked_upload_is_unrelated_to_its_plaintext() -> None:
    vector = torch.linspace(-50.0, 50.0, 20_000)
    plan = RoundPlan(0, 0, (0, 1, 2))

    masked = decode(_upload(1, plan, vector, 3.0)[:-1])

    correlation = torch.corrcoef(torch.stack([masked, vector.double()]))[0, 1]
    assert abs(float(correlation)) < 0.05


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"client_id": 9}, r"client 9 is not among the participants \[0, 1, 2\]"),
        ({"secrets": {1: bytes(32)}}, r"client 0 has no pairwise secret with peer\(s\) \[2\]"),
        ({"participants": (0,)}, "only participant"),
        ({"participants": (0, 1, 1)}, "repeats"),
        ({"weight": -1.0}, "weight must be finite and >= 0"),
        ({"vector": torch.ones(2, 2)}, "1-D float tensor"),
        ({"vector": torch.full((4,), 50.0), "bits": 32}, "does not fit a 32-bit upload of 3 participants"),
        ({"bits": 16}, "32 or 64 bits wide, not 16"),
    ],
    ids=["not-participant", "missing-secret", "alone", "duplicate", "negative-weight", "2-d", "too-wide-for-narrow", "bad-width"],
)
def test_masked_upload_rejects_bad_input(kwargs: dict, expected: str) -> None:
    arguments = {
        "vector": torch.ones(4),
        "weight": 1.0,
        "client_id": 0,
        "participants": (0, 1, 2),
        "secrets": {1: bytes(32), 2: bytes(32)},
        "round_index": 0,
        "attempt": 0,
    } | kwargs
    vector, weight = arguments.pop("vector"), arguments.pop("weight")

    with pytest.raises(ValueError, match=expected):
        masked_upload(vector, weight, **arguments)


# ------------------------------------------------------------------- SecureRounds


def _rounds(*clients: int) -> SecureRounds:
    rounds = SecureRounds()
    for client in clients:
        rounds.join(client)
    return rounds


def _begin_all(rounds: SecureRounds, round_index: int, *clients: int) -> RoundPlan:
    futures = [rounds.begin(c, round_index) for c in clients]
    plans = {_result(f) for f in futures}
    assert len(plans) == 1
    return plans.pop()


def _tensors_held(obj: object, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``obj`` through attributes, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors_held(item, seen)
    elif isinstance(obj, (list, tuple, set)):
        for item in obj:
            yield from _tensors_held(item, seen)
    elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        for item in vars(obj).values():
            yield from _tensors_held(item, seen)


def _run_threads(targets: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a client thread is still waiting"


def test_three_clients_in_threads_all_get_the_fedavg() -> None:
    rounds = _rounds(0, 1, 2)
    vectors = [torch.randn(257, generator=torch.Generator().manual_seed(c)) for c in range(3)]
    weights = [10.0, 30.0, 5.0]
    results: dict[int, RoundResult] = {}

    def client(c: int) -> None:
        plan = _result(rounds.begin(c, 0))
        results[c] = _result(rounds.upload(c, 0, plan.attempt, _upload(c, plan, vectors[c], weights[c]), 0.0))

    _run_threads([lambda c=c: client(c) for c in range(3)])

    assert {r.status for r in results.values()} == {"done"}
    averages = [results[c].average for c in range(3)]
    assert all(a is not None and a.dtype == torch.float32 and torch.equal(a, averages[0]) for a in averages)
    torch.testing.assert_close(averages[0], fedavg(vectors, weights), atol=1e-5, rtol=0)
    assert results[0].plan == RoundPlan(0, 0, (0, 1, 2))
    assert rounds.completed == 1


def test_begin_waits_for_every_active_client_and_leave_releases_it() -> None:
    rounds = _rounds(0, 1, 2)

    first = rounds.begin(0, 0)
    second = rounds.begin(1, 0)
    assert not first.done()
    rounds.leave(2)

    assert first.done() and second.done()
    assert _result(first) == _result(second) == RoundPlan(0, 0, (0, 1))


def test_a_client_leaving_before_upload_makes_the_round_redo_without_it() -> None:
    rounds = _rounds(0, 1, 2)
    vectors = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-4.0, 0.5, 8.0]), torch.tensor([100.0, 100.0, 100.0])]
    weights = [2.0, 6.0, 1.0]
    plan = _begin_all(rounds, 0, 0, 1, 2)

    early = rounds.upload(0, 0, plan.attempt, _upload(0, plan, vectors[0], weights[0]), 0.0)
    rounds.leave(2)
    late = rounds.upload(1, 0, plan.attempt, _upload(1, plan, vectors[1], weights[1]), 0.0)  # masked for a stale plan

    redo = RoundPlan(0, 1, (0, 1))
    assert _result(early) == _result(late) == RoundResult("redo", None, redo)
    again = [rounds.upload(c, 0, redo.attempt, _upload(c, redo, vectors[c], weights[c]), 0.0) for c in redo.participants]
    results = [_result(f) for f in again]

    assert [r.status for r in results] == ["done", "done"]
    assert results[0].average is not None
    torch.testing.assert_close(results[0].average, fedavg(vectors[:2], weights[:2]), atol=1e-5, rtol=0)
    assert rounds.completed == 1


def test_a_client_leaving_after_its_upload_does_not_abort_the_round() -> None:
    rounds = _rounds(0, 1, 2)
    vectors = [torch.full((4,), float(c)) for c in range(3)]
    plan = _begin_all(rounds, 0, 0, 1, 2)

    futures = [rounds.upload(0, 0, 0, _upload(0, plan, vectors[0], 1.0), 0.0)]
    rounds.leave(0)  # its masks are in its upload already, so they still cancel
    futures += [rounds.upload(c, 0, 0, _upload(c, plan, vectors[c], 1.0), 0.0) for c in (1, 2)]

    averages = [_result(f).average for f in futures]
    assert all(a is not None and torch.allclose(a, torch.full((4,), 1.0)) for a in averages)


def test_a_lone_client_gets_its_vector_back_bit_exactly() -> None:
    rounds = _rounds(3)
    vector = torch.tensor([0.1, -0.0, 1e-40, 3.4e38, -7.123456789], dtype=torch.float32)
    plan = _begin_all(rounds, 0, 3)

    result = _result(rounds.upload(3, 0, plan.attempt, vector, 12.0))

    assert plan == RoundPlan(0, 0, (3,))
    assert result.status == "done" and result.average is not None
    assert result.average.dtype == vector.dtype
    assert torch.equal(result.average.view(torch.int32), vector.view(torch.int32))


def test_a_redo_down_to_one_client_asks_for_the_plain_vector() -> None:
    rounds = _rounds(0, 1)
    plan = _begin_all(rounds, 0, 0, 1)
    vector = torch.tensor([1.25, -3.5])

    stale = rounds.upload(0, 0, 0, _upload(0, plan, vector, 2.0), 0.0)
    rounds.leave(1)
    redo = _result(stale).plan
    result = _result(rounds.upload(0, 0, redo.attempt, vector, 2.0))

    assert redo == RoundPlan(0, 1, (0,))
    assert result.average is not None and torch.equal(result.average, vector)


def test_a_round_without_samples_fails_every_waiting_client() -> None:
    rounds = _rounds(0, 1)
    plan = _begin_all(rounds, 0, 0, 1)

    futures = [rounds.upload(c, 0, 0, _upload(c, plan, torch.ones(3), 0.0), 0.0) for c in (0, 1)]

    for future in futures:
        with pytest.raises(ValueError, match="no samples were contributed"):
            _result(future)


def _state(rounds: SecureRounds) -> dict[str, str]:
    """Everything the server holds, as text (tensors are small enough to print in full)."""
    return {name: repr(value) for name, value in vars(rounds).items() if name != "_lock"}


@pytest.mark.parametrize(
    ("client", "attempt", "make", "weight", "expected"),
    [
        (1, 0, lambda good: good.double(), 0.0, "client 1: with 3 participants the upload must be the non-empty 1-D int64"),
        (1, 0, lambda good: good[:-1], 0.0, "client 1: upload has 5 entries, expected 6 \\(5 values and the weight\\)"),
        (1, 0, lambda good: good.view(2, 3), 0.0, "client 1: with 3 participants"),
        (1, 0, lambda good: good, 4.0, "client 1: the weight is inside the masked upload; pass weight 0.0"),
        (3, 0, lambda good: good, 0.0, "client 3 is not a participant of round 0 attempt 0"),
        (5, 0, lambda good: good, 0.0, "client 5 is not an active member"),
        (1, 1, lambda good: good, 0.0, "client 1: round 0 is at attempt 0, not 1"),
        (0, 0, lambda good: good, 0.0, "client 0 already uploaded"),
    ],
    ids=["float", "short", "2-d", "clear-weight", "not-participant", "not-member", "future-attempt", "twice"],
)
def test_bad_uploads_raise_without_changing_state(
    client: int, attempt: int, make: Callable[[torch.Tensor], torch.Tensor], weight: float, expected: str
) -> None:
    rounds = _rounds(0, 1, 2)
    vectors = [torch.full((5,), float(c)) for c in range(3)]
    plan = _begin_all(rounds, 0, 0, 1, 2)
    rounds.join(3)  # joined after the plan: not a participant of round 0
    first = rounds.upload(0, 0, 0, _upload(0, plan, vectors[0], 1.0), 0.0)
    before = _state(rounds)

    with pytest.raises(ValueError, match=expected):
        rounds.upload(client, 0, attempt, make(_upload(1, plan, vectors[1], 1.0)), weight)

    assert _state(rounds) == before
    rest = [rounds.upload(c, 0, 0, _upload(c, plan, vectors[c], 1.0), 0.0) for c in (1, 2)]
    assert all(_result(f).status == "done" for f in [first, *rest])
    assert torch.allclose(_result(first).average, torch.full((5,), 1.0))


def test_a_stale_attempt_is_told_to_redo_without_changing_state() -> None:
    rounds = _rounds(0, 1, 2)
    plan = _begin_all(rounds, 0, 0, 1, 2)
    rounds.leave(2)
    current = RoundPlan(0, 1, (0, 1))
    before = _state(rounds)

    stale: Future = rounds.upload(0, 0, plan.attempt, _upload(0, plan, torch.ones(3), 1.0), 0.0)

    assert stale.done() and _result(stale) == RoundResult("redo", None, current)
    assert _state(rounds) == before


def test_uploads_before_begin_or_after_the_round_are_refused() -> None:
    rounds = _rounds(0)

    with pytest.raises(ValueError, match="round 0 has no plan yet; call begin first"):
        rounds.upload(0, 0, 0, torch.ones(2), 1.0)
    _begin_all(rounds, 0, 0)
    _result(rounds.upload(0, 0, 0, torch.ones(2), 1.0))
    with pytest.raises(ValueError, match="round 0 is already finished"):
        rounds.upload(0, 0, 0, torch.ones(2), 1.0)
    with pytest.raises(ValueError, match="round 0 is already finished"):
        rounds.begin(0, 0)


def test_the_server_never_holds_a_plaintext_update_of_a_shared_round() -> None:
    rounds = _rounds(0, 1, 2)
    vectors = [torch.randn(300, generator=torch.Generator().manual_seed(c)) for c in range(3)]
    plan = _begin_all(rounds, 0, 0, 1, 2)
    sent = [_upload(c, plan, vectors[c], 2.0) for c in (0, 1)]

    for c in (0, 1):
        rounds.upload(c, 0, 0, sent[c], 0.0)
    held = list(_tensors_held(rounds))

    assert len(held) == 2
    assert all(t.dtype == torch.int64 and any(torch.equal(t, s) for s in sent) for t in held)
    for vector in vectors:
        plain = encode(vector.double() * 2.0)
        assert not any(torch.equal(t[:-1], plain) for t in held)
