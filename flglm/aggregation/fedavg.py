"""FedAvg of the client blocks: the pure average, and the server-side round that gathers it.

What to aggregate (the strategy) is kept apart from how updates move (the transport): the
``fedavg`` function is pure, ``AggregationRounds`` only collects contributions and hands the
average back through futures, so no RPC thread blocks while a round fills.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.futures import Future

from flglm.link.messages import InvalidMessageError


def fedavg(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted mean of equally shaped tensors; equal weights when all weights are zero."""
    if not vectors:
        raise ValueError("fedavg needs at least one contribution")
    if len(vectors) != len(weights):
        raise ValueError(f"{len(vectors)} vectors but {len(weights)} weights")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    shapes = {tuple(v.shape) for v in vectors}
    if len(shapes) > 1:
        # Without this, broadcasting would silently average a [1] tensor into a [n] one.
        raise ValueError(f"fedavg needs equally shaped tensors, got shapes {sorted(list(s) for s in shapes)}")
    total = float(sum(weights))
    coeffs = [w / total for w in weights] if total > 0 else [1.0 / len(vectors)] * len(vectors)
    out = torch.zeros_like(vectors[0], dtype=torch.float64)
    for vector, coeff in zip(vectors, coeffs):
        out += vector.double() * coeff
    return out.to(vectors[0].dtype)


@dataclass
class _Round:
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)
    futures: dict[int, Future] = field(default_factory=dict)


class AggregationRounds:
    """Collects each active client's contribution to round ``r`` and answers all at once.

    A round completes when every active client has contributed; a client that leaves the
    federation stops being waited for, so the others never deadlock on it.

    ``combine`` (hierarchical serving) turns a completed round's local contributions into the
    federation-wide average, answered later through a future; without it the round's answer
    is the FedAvg of its own contributions.
    """

    def __init__(self, combine: Callable[[int, list[torch.Tensor], list[float]], Future] | None = None) -> None:
        self._combine = combine
        self._lock = threading.Lock()
        self._rounds: dict[int, _Round] = {}
        self._active: set[int] = set()
        self._size: int | None = None
        self.completed = 0

    def join(self, client_id: int) -> None:
        with self._lock:
            self._active.add(client_id)

    def next_round(self) -> int:
        """The first round a client joining now takes part in: the oldest round still open
        (it waits for every active client), else the one after the last completed."""
        with self._lock:
            return min(self._rounds) if self._rounds else self.completed

    def leave(self, client_id: int) -> None:
        with self._lock:
            self._active.discard(client_id)
            ready = [r for r in list(self._rounds) if self._ready(r)]
            results = [self._finish(r) for r in ready]
        for finished in results:
            self._deliver(*finished)

    def contribute(self, client_id: int, round_index: int, vector: torch.Tensor, weight: float) -> Future:
        if vector.dim() != 1 or not vector.is_floating_point():
            raise InvalidMessageError(f"client {client_id}: aggregation vector must be a 1-D float tensor, got {vector.dtype} {list(vector.shape)}")
        if not torch.isfinite(vector).all():
            raise InvalidMessageError(f"client {client_id}: aggregation vector holds NaN or Inf")
        if not math.isfinite(weight) or weight < 0:
            # Checked here, not only in fedavg: a failure while finishing a round would leave the
            # other contributors' futures unresolved.
            raise InvalidMessageError(f"client {client_id}: aggregation weight must be finite and >= 0, got {weight}")
        future: Future = Future()
        with self._lock:
            if client_id not in self._active:
                raise InvalidMessageError(f"client {client_id} is not an active member of the federation")
            if self._size is None:
                self._size = vector.numel()
            elif vector.numel() != self._size:
                raise InvalidMessageError(f"client {client_id}: aggregation vector has {vector.numel()} entries, expected {self._size}")
            state = self._rounds.setdefault(round_index, _Round())
            if client_id in state.vectors:
                raise InvalidMessageError(f"client {client_id} already contributed to round {round_index}")
            state.vectors[client_id] = vector
            state.weights[client_id] = float(weight)
            state.futures[client_id] = future
            finished = self._finish(round_index) if self._ready(round_index) else None
        if finished is not None:
            self._deliver(*finished)
        return future

    def _ready(self, round_index: int) -> bool:
        state = self._rounds[round_index]
        return bool(state.vectors) and self._active <= set(state.vectors)

    def _finish(self, round_index: int) -> tuple[int, _Round]:
        self.completed += 1
        return round_index, self._rounds.pop(round_index)

    def _deliver(self, round_index: int, state: _Round) -> None:
        """Answer a completed round; called after the lock is released, so a slow average or
        ``combine`` never holds up other clients' contributions."""
        ids = sorted(state.vectors)
        vectors, weights = [state.vectors[i] for i in ids], [state.weights[i] for i in ids]
        if self._combine is None:
            _resolve(state, fedavg(vectors, weights))
            return

        def answer(done: Future) -> None:
            try:
                average = done.wait()
            except Exception as err:  # noqa: BLE001 - every contributor learns why
                for future in state.futures.values():
                    future.set_exception(err)
                return
            _resolve(state, average)

        self._combine(round_index, vectors, weights).add_done_callback(answer)


def _resolve(state: _Round, average: torch.Tensor) -> None:
    for future in state.futures.values():
        future.set_result(average)
