"""The server's side of secure aggregation: collects masked uploads and answers every participant.

The server only ever holds the masked uploads (int64, or int32 when the plan is narrow) of a round with two or more participants
(see :mod:`flglm.aggregation.masking` for the masking and its threat model). A round
is planned once every active client has begun it; if a participant leaves before uploading,
the round is redone without it, with fresh masks.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch.futures import Future

from flglm.aggregation.masking import MAX_CLIENTS, UPLOAD_DTYPES, WIDE_BITS, plan_bits, unmask_average
from flglm.link.messages import InvalidMessageError


@dataclass(frozen=True)
class RoundPlan:
    """Who masks with whom in one attempt of a round; clients mask for exactly these participants."""

    round_index: int
    attempt: int
    participants: tuple[int, ...]
    bits: int = WIDE_BITS
    """Width of every masked upload: :data:`NARROW_BITS` when each participant said its values fit."""


@dataclass(frozen=True)
class RoundResult:
    """``"done"`` with the average, or ``"redo"``: mask again for ``plan`` (the next attempt) and re-upload."""

    status: Literal["done", "redo"]
    average: torch.Tensor | None
    plan: RoundPlan


@dataclass
class _Pending:
    """A round whose plan is not made yet: who has begun it."""

    futures: dict[int, Future] = field(default_factory=dict)
    narrow: set[int] = field(default_factory=set)
    """Those whose values fit a narrow upload."""


@dataclass
class _Attempt:
    """The current attempt of a planned round. ``uploads`` are masked int64 unless the plan has one client."""

    plan: RoundPlan
    uploads: dict[int, torch.Tensor] = field(default_factory=dict)
    futures: dict[int, Future] = field(default_factory=dict)
    leavers: set[int] = field(default_factory=set)
    """Coordinated rounds: this server's participants that left before uploading."""
    handed_on: bool = False


_Delivery = Callable[[], None]


class RoundCoordinator(Protocol):
    """Makes rounds federation-wide when several sub-servers share them (``SubServerSync``).

    ``plan`` answers with ``(participants, bits)``: every sub-server's participants (all of them began
    the round) and the upload width (narrow only if every participant anywhere fits);
    ``attempt`` with ``("done", average, participants)`` or, if a participant anywhere left
    before uploading, ``("redo", None, remaining participants)``."""

    def plan(self, round_index: int, began: set[int], narrow: set[int]) -> Future: ...

    def attempt(self, plan: RoundPlan, uploads: dict[int, torch.Tensor], leavers: set[int]) -> Future: ...


class SecureRounds:
    """Collects masked uploads of each round and answers with the average, never holding a plaintext update.

    ``begin`` fixes the participants of a round once every active client has begun it; ``upload`` completes
    the round when every participant has uploaded. A participant that leaves before uploading aborts the
    attempt: everyone is told to ``"redo"`` it for a plan without that client. Futures are resolved outside
    the lock, so a callback that calls back in cannot deadlock.

    With a ``coordinator`` (hierarchical serving) this server holds only its own clients' part of each
    round: the plan spans every sub-server's participants, the uploads are summed across sub-servers
    (pairwise masks between clients of different sub-servers cancel only there), and a participant that
    leaves anywhere makes every sub-server redo the attempt.
    """

    def __init__(self, coordinator: RoundCoordinator | None = None) -> None:
        self._coordinator = coordinator
        self._served: set[int] = set()
        self._lock = threading.Lock()
        self._active: set[int] = set()
        self._pending: dict[int, _Pending] = {}
        self._attempts: dict[int, _Attempt] = {}
        self._finished: set[int] = set()
        self._size: int | None = None
        self.completed = 0

    def join(self, client_id: int) -> None:
        with self._lock:
            if client_id not in self._active and len(self._active) >= MAX_CLIENTS:
                raise InvalidMessageError(f"client {client_id} cannot join: secure aggregation supports at most {MAX_CLIENTS} clients")
            self._active.add(client_id)
            self._served.add(client_id)

    def leave(self, client_id: int) -> None:
        deliveries: list[_Delivery] = []
        with self._lock:
            self._active.discard(client_id)
            for round_index in list(self._pending):
                deliveries += self._plan_if_ready(round_index)
            for round_index, state in list(self._attempts.items()):
                if client_id in state.plan.participants and client_id not in state.uploads:
                    if self._coordinator is None:
                        deliveries += self._redo(round_index)
                    else:
                        state.leavers.add(client_id)
                        deliveries += self._hand_on_if_ready(round_index)
        for deliver in deliveries:
            deliver()

    def next_round(self) -> int:
        """The first round a client joining now takes part in: the oldest round not yet planned
        (planning waits for every active client), else the one after every planned or finished
        round (a plan made without the client goes on without it)."""
        with self._lock:
            if self._pending:
                return min(self._pending)
            return max(self._finished | set(self._attempts), default=self.completed - 1) + 1

    def begin(self, client_id: int, round_index: int, narrow: bool = False) -> Future:
        """A future of the round's :class:`RoundPlan`, resolved once every active client has begun it;
        ``narrow``: the client's values fit a narrow upload (:func:`~flglm.aggregation.masking.fits_narrow`)."""
        future: Future = Future()
        with self._lock:
            self._check_member(client_id)
            if round_index in self._finished:
                raise InvalidMessageError(f"client {client_id}: round {round_index} is already finished")
            if round_index in self._attempts:
                # Joined after the plan was made: this round goes on without the client.
                future.set_result(self._attempts[round_index].plan)
                return future
            state = self._pending.setdefault(round_index, _Pending())
            if client_id in state.futures:
                raise InvalidMessageError(f"client {client_id} already began round {round_index}")
            state.futures[client_id] = future
            if narrow:
                state.narrow.add(client_id)
            deliveries = self._plan_if_ready(round_index)
        for deliver in deliveries:
            deliver()
        return future

    def upload(self, client_id: int, round_index: int, attempt: int, vector: torch.Tensor, weight: float) -> Future:
        """A future of the :class:`RoundResult`; ``vector`` is a :func:`masked_upload` unless the plan has one client."""
        future: Future = Future()
        with self._lock:
            self._check_member(client_id)
            if round_index in self._finished:
                raise InvalidMessageError(f"client {client_id}: round {round_index} is already finished")
            state = self._attempts.get(round_index)
            if state is None:
                raise InvalidMessageError(f"client {client_id}: round {round_index} has no plan yet; call begin first")
            plan = state.plan
            if attempt < plan.attempt:
                # Masked for a plan that no longer holds; the masks would not cancel, so ask for a redo.
                future.set_result(RoundResult("redo", None, plan))
                return future
            if attempt > plan.attempt:
                raise InvalidMessageError(f"client {client_id}: round {round_index} is at attempt {plan.attempt}, not {attempt}")
            if client_id not in plan.participants:
                raise InvalidMessageError(
                    f"client {client_id} is not a participant of round {round_index} attempt {attempt}: {list(plan.participants)}"
                )
            if client_id in state.uploads:
                raise InvalidMessageError(f"client {client_id} already uploaded to round {round_index} attempt {attempt}")
            size = self._check_upload(client_id, plan, vector, weight)
            self._size = size
            state.uploads[client_id] = vector.detach()
            state.futures[client_id] = future
            if self._coordinator is not None:
                deliveries = self._hand_on_if_ready(round_index)
            else:
                deliveries = self._finish(round_index) if len(state.uploads) == len(plan.participants) else []
        for deliver in deliveries:
            deliver()
        return future

    def _check_member(self, client_id: int) -> None:
        if client_id not in self._active:
            raise InvalidMessageError(f"client {client_id} is not an active member of the federation")

    def _check_upload(self, client_id: int, plan: RoundPlan, vector: torch.Tensor, weight: float) -> int:
        """The plain vector length the upload implies; raises before anything is stored."""
        if len(plan.participants) == 1:
            if vector.dim() != 1 or not vector.is_floating_point():
                raise InvalidMessageError(
                    f"client {client_id}: a lone participant uploads its 1-D float vector, got {vector.dtype} {list(vector.shape)}"
                )
            if not torch.isfinite(vector).all():
                raise InvalidMessageError(f"client {client_id}: aggregation vector holds NaN or Inf")
            if not math.isfinite(weight) or weight < 0:
                raise InvalidMessageError(f"client {client_id}: aggregation weight must be finite and >= 0, got {weight}")
            size = vector.numel()
        else:
            dtype = UPLOAD_DTYPES[plan.bits]
            if vector.dim() != 1 or vector.dtype != dtype or vector.numel() == 0:
                raise InvalidMessageError(
                    f"client {client_id}: with {len(plan.participants)} participants the upload must be the non-empty 1-D "
                    f"{str(dtype).removeprefix('torch.')} masked_upload of the {plan.bits}-bit plan, got {vector.dtype} {list(vector.shape)}"
                )
            if weight != 0.0:
                # The weight travels masked inside the upload; a clear copy would leak it.
                raise InvalidMessageError(f"client {client_id}: the weight is inside the masked upload; pass weight 0.0, got {weight}")
            size = vector.numel() - 1
        if self._size is not None and size != self._size:
            expected = f"{self._size}" if len(plan.participants) == 1 else f"{self._size + 1} ({self._size} values and the weight)"
            raise InvalidMessageError(f"client {client_id}: upload has {vector.numel()} entries, expected {expected}")
        return size

    def _plan_if_ready(self, round_index: int) -> list[_Delivery]:
        state = self._pending[round_index]
        if not self._active <= set(state.futures):
            return []
        del self._pending[round_index]
        began = set(state.futures) & self._active
        narrow = state.narrow & began
        if self._coordinator is not None:
            coordinator = self._coordinator
            return [lambda: coordinator.plan(round_index, began, narrow).add_done_callback(lambda done: self._planned(round_index, state, done))]
        plan = RoundPlan(round_index, 0, tuple(sorted(began)), plan_bits(began, narrow))
        if plan.participants:
            self._attempts[round_index] = _Attempt(plan)
        return [_resolver(f, plan) for f in state.futures.values()]

    def _redo(self, round_index: int) -> list[_Delivery]:
        old = self._attempts.pop(round_index)
        # Fewer participants than planned: a narrow plan's sum still fits.
        plan = RoundPlan(round_index, old.plan.attempt + 1, tuple(p for p in old.plan.participants if p in self._active), old.plan.bits)
        if plan.participants:
            self._attempts[round_index] = _Attempt(plan)
        result = RoundResult("redo", None, plan)
        return [_resolver(f, result) for f in old.futures.values()]

    def _finish(self, round_index: int) -> list[_Delivery]:
        state = self._attempts.pop(round_index)
        self._finished.add(round_index)
        self.completed += 1
        ids = state.plan.participants
        if len(ids) == 1:
            # Bit-exact: a one-client federation must match centralized training.
            average = state.uploads[ids[0]]
        else:
            try:
                average = unmask_average([state.uploads[i] for i in ids], bits=state.plan.bits)
            except ValueError as error:
                # Every waiting participant must hear of it, or they would wait forever.
                return [_failer(f, error) for f in state.futures.values()]
        result = RoundResult("done", average, state.plan)
        return [_resolver(f, result) for f in state.futures.values()]

    # ------------------------------------------------------- coordinated rounds
    def _planned(self, round_index: int, pending: _Pending, done: Future) -> None:
        """The coordinator's plan arrived: open the attempt and tell this server's clients."""
        try:
            participants, bits = done.wait()
        except Exception as error:  # noqa: BLE001 - every waiting client must hear of it
            for future in pending.futures.values():
                future.set_exception(error)
            return
        plan = RoundPlan(round_index, 0, tuple(sorted(participants)), bits)
        with self._lock:
            deliveries = [_resolver(f, plan) for f in pending.futures.values()]
            deliveries += self._open(plan)
        for deliver in deliveries:
            deliver()

    def _open(self, plan: RoundPlan) -> list[_Delivery]:
        if not plan.participants:
            return []
        state = _Attempt(plan)
        # A participant of this server that left while the plan was being made will not upload.
        state.leavers = {p for p in plan.participants if p in self._served and p not in self._active}
        self._attempts[plan.round_index] = state
        return self._hand_on_if_ready(plan.round_index)

    def _hand_on_if_ready(self, round_index: int) -> list[_Delivery]:
        """Once each of this server's participants has uploaded or left, hand the attempt to the coordinator."""
        state = self._attempts[round_index]
        mine = [p for p in state.plan.participants if p in self._served]
        if state.handed_on or any(p not in state.uploads and p not in state.leavers for p in mine):
            return []
        state.handed_on = True
        coordinator = self._coordinator
        assert coordinator is not None
        uploads, leavers = dict(state.uploads), set(state.leavers)
        return [lambda: coordinator.attempt(state.plan, uploads, leavers).add_done_callback(lambda done: self._attempted(state, done))]

    def _attempted(self, state: _Attempt, done: Future) -> None:
        """The coordinator's answer: the average, or a redo for the remaining participants."""
        round_index = state.plan.round_index
        try:
            status, average, participants = done.wait()
        except Exception as error:  # noqa: BLE001 - every waiting client must hear of it
            for future in state.futures.values():
                future.set_exception(error)
            return
        with self._lock:
            self._attempts.pop(round_index, None)
            if status == "done":
                self._finished.add(round_index)
                self.completed += 1
                result = RoundResult("done", average, state.plan)
                deliveries = []
            else:
                plan = RoundPlan(round_index, state.plan.attempt + 1, tuple(sorted(participants)), state.plan.bits)
                result = RoundResult("redo", None, plan)
                deliveries = self._open(plan)
            deliveries = [*(_resolver(f, result) for f in state.futures.values()), *deliveries]
        for deliver in deliveries:
            deliver()


def _resolver(future: Future, value: object) -> _Delivery:
    return lambda: future.set_result(value)


def _failer(future: Future, error: Exception) -> _Delivery:
    return lambda: future.set_exception(error)
