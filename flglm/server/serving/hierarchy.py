"""Hierarchical serving: keeps the sub-servers' replicas of the middle stack in step.

Each sub-server trains its own replica of the middle stack with its own clients. They meet at
the federation's FedAvg rounds, with collectives over the process group of the server ranks
(``flglm.distributed.init_server_group``), never over RPC:

- the client blocks are averaged over *all* clients: each sub-server contributes the sums
  (Σ w·x, Σ x, Σ w, n) of its own clients' uploads, one all-reduce adds them, and every
  sub-server answers its clients with the global FedAvg;
- with secure aggregation, the rounds' plans span every sub-server's participants (an
  all-reduce of who began), the masked uploads are summed across sub-servers (int64 all-reduce,
  which wraps like the masks do) before unmasking, and a participant that left anywhere makes
  every sub-server redo the attempt (``SubServerSync`` is the ``RoundCoordinator`` of
  ``SecureRounds``);
- every ``sync_every`` rounds, and always when training ends, the middle stacks are averaged,
  weighted by the samples each replica trained on since the last synchronisation.

Collectives must be called the same number of times, in the same order, by every sub-server.
One thread per sub-server makes them, round after round. A sub-server whose clients have all
left keeps taking part with empty contributions until every sub-server is done; the last
collective (nobody active) is the final middle synchronisation. Rounds are matched by
their index, and a mismatch fails loudly instead of mixing rounds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.futures import Future

from flglm.aggregation.masking import plan_bits, unmask_sum
from flglm.aggregation.secure_rounds import RoundPlan

log = logging.getLogger("flglm.hierarchy")


@dataclass
class _LocalRound:
    """Plain FedAvg: this sub-server's clients' uploads of a round."""

    round_index: int
    vectors: list[torch.Tensor]
    weights: list[float]
    future: Future


@dataclass
class _SecurePlan:
    """Secure aggregation: which of this sub-server's clients began the round."""

    round_index: int
    began: set[int]
    narrow: set[int]
    future: Future


@dataclass
class _SecureAttempt:
    """Secure aggregation: this sub-server's masked uploads of one attempt, and who left instead."""

    plan: RoundPlan
    uploads: dict[int, torch.Tensor]
    leavers: set[int]
    future: Future


class _Done:
    """This sub-server's clients have all left."""


_Event = _LocalRound | _SecurePlan | _SecureAttempt
# Collective kinds, sent in each step's header so every sub-server runs the same collective.
_NONE, _PLAIN, _PLAN, _ATTEMPT = 0, 1, 2, 3


class SubServerSync:
    """One sub-server's side of the synchronisation (see the module docstring).

    Args:
        params: the replica's trainable middle-stack parameters (averaged in place).
        lock: the server's lock; held while the parameters are read or written.
        num_clients: clients of the whole federation (the length of a plan's participant mask).
        sync_every: average the middle stacks every this many FedAvg rounds.
        sync_step: each synchronisation moves the replicas from the last synchronised weights by
            this multiple of the averaged change (1: plain averaging).
        on_error: called with the exception if a collective fails (the server aborts).
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        lock: threading.RLock,
        *,
        num_clients: int,
        sync_every: int,
        sync_step: float = 1.0,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        if not sync_step > 0:
            raise ValueError(f"sync_step must be > 0, got {sync_step}")
        self._sync_step = float(sync_step)
        # The last synchronised weights (all replicas start equal); only needed for sync_step != 1.
        self._anchor = torch.cat([p.detach().reshape(-1).double() for p in params]) if sync_step != 1.0 and params else None
        self._params = list(params)
        self._num_clients = num_clients
        self._lock = lock
        self._sync_every = sync_every
        self._on_error = on_error
        self._events: queue.Queue[_Event | _Done] = queue.Queue()
        self._samples = 0
        self.rounds = 0
        self.middle_syncs = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="flglm-sub-server-sync", daemon=True)
        self._thread.start()

    @property
    def index(self) -> int:
        return dist.get_rank()

    @property
    def size(self) -> int:
        return dist.get_world_size()

    # -------------------------------------------------------- called by the server
    def add_samples(self, n: int) -> None:
        """Count samples the replica trained on (the caller holds the server's lock)."""
        self._samples += int(n)

    def combine(self, round_index: int, vectors: list[torch.Tensor], weights: list[float]) -> Future:
        """The global FedAvg of round ``round_index``, given this sub-server's clients' uploads."""
        return self._submit(_LocalRound(round_index, vectors, weights, Future()))

    def plan(self, round_index: int, began: set[int], narrow: set[int]) -> Future:
        """Secure aggregation: every sub-server's participants of round ``round_index`` and the upload width."""
        return self._submit(_SecurePlan(round_index, set(began), set(narrow), Future()))

    def attempt(self, plan: RoundPlan, uploads: dict[int, torch.Tensor], leavers: set[int]) -> Future:
        """Secure aggregation: ``("done", average, participants)`` or ``("redo", None, remaining)``."""
        return self._submit(_SecureAttempt(plan, dict(uploads), set(leavers), Future()))

    def _submit(self, event: _Event) -> Future:
        if self.error is not None:
            event.future.set_exception(self.error)
        else:
            self._events.put(event)
        return event.future

    def finish(self, timeout: float | None = None) -> None:
        """Wait, after this sub-server's clients have all left, until every sub-server is done."""
        self._events.put(_Done())
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"sub-server {self.index}: the other sub-servers did not finish within {timeout}s")
        if self.error is not None:
            raise RuntimeError(f"sub-server {self.index}: synchronisation failed: {self.error}") from self.error

    def gather_json(self, value: Any) -> list[Any]:
        """Every sub-server's ``value`` (JSON, not pickle), in sub-server order; call after ``finish``."""
        blob = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor([blob.numel()], dtype=torch.int64))
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: blob.numel()] = blob
        gathered = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.size)]
        dist.all_gather(gathered, padded)
        return [json.loads(bytes(g[: int(s.item())].tolist()).decode()) for g, s in zip(gathered, sizes)]

    def stats(self) -> dict[str, Any]:
        """Counts, and a hash of the replica: equal on every sub-server after the final synchronisation."""
        digest = hashlib.sha256()
        with self._lock:
            for p in self._params:
                digest.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return {"sync_rounds": self.rounds, "middle_syncs": self.middle_syncs, "middle_sha256": digest.hexdigest()}

    # ------------------------------------------------------------ the sync thread
    def _run(self) -> None:
        local_done = False
        event: _Event | _Done | None = None
        try:
            while True:
                event = None if local_done else self._events.get()
                if isinstance(event, _Done):
                    local_done, event = True, None
                if not self._collective(event):
                    return
        except BaseException as err:  # reported to the waiting clients and to the server
            log.exception("sub-server synchronisation failed")
            self.error = err
            self._fail_pending(err, event)
            if self._on_error is not None:
                self._on_error(err)

    def _collective(self, event: _Event | None) -> bool:
        """One step of the lock-step protocol; False once every sub-server is done.

        Each step starts with an all-gather of (kind, round, attempt, size): a sub-server without
        an event of its own (its clients have left) learns which collective the others run and
        takes part with an empty contribution."""
        header = torch.tensor(_header(event), dtype=torch.int64)
        headers = [torch.zeros(4, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(headers, header)
        active = [tuple(int(v) for v in h) for h in headers if h[0] != _NONE]
        if not active:
            self._sync_middle(final=True)
            return False
        steps = sorted({h[:3] for h in active})
        sizes = sorted({h[3] for h in active if h[3] >= 0})
        if len(steps) > 1 or len(sizes) > 1:
            raise RuntimeError(
                f"sub-servers out of step: (kind, round, attempt) {steps} with upload sizes {sizes}; the active "
                "sub-servers must meet at the same aggregation round, in the same order"
            )
        kind, round_index, _ = steps[0]
        numel = sizes[0] if sizes else 0
        if kind == _PLAIN:
            assert event is None or isinstance(event, _LocalRound)
            average = self._reduce_round(event, numel)
            self._round_done(round_index)
            if event is not None:
                event.future.set_result(average.to(event.vectors[0].dtype))
        elif kind == _PLAN:
            assert event is None or isinstance(event, _SecurePlan)
            participants = self._reduce_plan(event)
            if event is not None:
                event.future.set_result(participants)
        else:
            assert event is None or isinstance(event, _SecureAttempt)
            result = self._reduce_attempt(event, numel)
            if result[0] == "done":
                self._round_done(round_index)
            if event is not None:
                event.future.set_result(result)
        return True

    def _round_done(self, round_index: int) -> None:
        self.rounds += 1
        if (round_index + 1) % self._sync_every == 0:
            self._sync_middle(final=False)

    def _reduce_round(self, event: _LocalRound | None, numel: int) -> torch.Tensor:
        """Global FedAvg from every sub-server's sums (float64): Σw·x / Σw, or Σx / n if Σw = 0."""
        sums = torch.zeros(2 * numel + 2, dtype=torch.float64)
        if event is not None:
            for vector, weight in zip(event.vectors, event.weights):
                v = vector.double()
                sums[:numel] += weight * v
                sums[numel : 2 * numel] += v
            sums[-2] = float(sum(event.weights))
            sums[-1] = float(len(event.vectors))
        dist.all_reduce(sums)
        total_weight, count = float(sums[-2]), float(sums[-1])
        if total_weight > 0:
            return sums[:numel] / total_weight
        return sums[numel : 2 * numel] / count

    def _union(self, clients: set[int]) -> tuple[int, ...]:
        """The union over the sub-servers of a set of client ids (an all-reduce of membership masks), sorted."""
        mask = torch.zeros(self._num_clients, dtype=torch.int64)
        if clients:
            mask[sorted(clients)] = 1
        dist.all_reduce(mask)
        return tuple(int(i) for i in mask.nonzero().flatten())

    def _reduce_plan(self, event: _SecurePlan | None) -> tuple[tuple[int, ...], int]:
        """Union of the sub-servers' clients that began the round; narrow if each of them fits."""
        began = self._union(event.began if event is not None else set())
        narrow = self._union(event.narrow if event is not None else set())
        return began, plan_bits(began, narrow)

    def _reduce_attempt(self, event: _SecureAttempt | None, numel: int) -> tuple[str, torch.Tensor | None, tuple[int, ...]]:
        """Redo without whoever left anywhere, or the average of the sum of every sub-server's uploads."""
        leavers = set(self._union(event.leavers if event is not None else set()))
        plan = event.plan if event is not None else None
        if leavers:
            remaining = tuple(p for p in plan.participants if p not in leavers) if plan is not None else ()
            return "redo", None, remaining
        uploads = list(event.uploads.values()) if event is not None else []
        count = _max_over_sub_servers(len(plan.participants) if plan is not None else 0)
        if count == 1:  # a plan of one client: its vector travels in the clear (see secure_rounds)
            total = torch.zeros(numel, dtype=torch.float64)
            for upload in uploads:
                total += upload.double()
            dist.all_reduce(total)
            return "done", total.to(torch.float32), plan.participants if plan is not None else ()
        bits = _max_over_sub_servers(plan.bits if plan is not None else 0)  # one that holds no part learns it
        total = torch.zeros(numel, dtype=torch.int64)
        for upload in uploads:
            total += upload  # int64 wraps, like the masks; int32 uploads widen (taken modulo 2**32 at the end)
        dist.all_reduce(total)
        return "done", unmask_sum(total, participants=count, bits=bits), plan.participants if plan is not None else ()

    def _sync_middle(self, *, final: bool) -> None:
        """Replace every replica by the sample-weighted average of all replicas."""
        if not self._params:
            return
        with self._lock:
            flat = torch.cat([p.detach().reshape(-1).double() for p in self._params])
            samples = float(self._samples)
        payload = torch.cat([flat * samples, torch.tensor([samples], dtype=torch.float64)])
        dist.all_reduce(payload)
        total = float(payload[-1])
        with self._lock:
            self._samples = 0
            if total > 0:
                average = payload[:-1] / total
                if self._anchor is not None:
                    average = self._anchor + self._sync_step * (average - self._anchor)
                    self._anchor = average.clone()
                offset = 0
                with torch.no_grad():
                    for p in self._params:
                        p.copy_(average[offset : offset + p.numel()].view_as(p))
                        offset += p.numel()
        self.middle_syncs += 1
        log.info("middle stacks averaged over %d sub-servers (%s, %.0f samples)", self.size, "final" if final else "round", total)

    def _fail_pending(self, err: BaseException, current: _Event | _Done | None) -> None:
        pending = [current] if current is not None and not isinstance(current, _Done) else []
        while True:
            try:
                pending.append(self._events.get_nowait())  # type: ignore[arg-type]
            except queue.Empty:
                break
        for event in pending:
            if not isinstance(event, _Done) and not event.future.done():
                event.future.set_exception(RuntimeError(f"sub-server synchronisation failed: {err}"))


def _header(event: _Event | None) -> list[int]:
    """(kind, round, attempt, upload size or -1 when this sub-server holds no upload)."""
    if event is None:
        return [_NONE, -1, -1, -1]
    if isinstance(event, _LocalRound):
        return [_PLAIN, event.round_index, 0, event.vectors[0].numel()]
    if isinstance(event, _SecurePlan):
        return [_PLAN, event.round_index, 0, -1]
    size = next(iter(event.uploads.values())).numel() if event.uploads else -1
    return [_ATTEMPT, event.plan.round_index, event.plan.attempt, size]


def _max_over_sub_servers(value: int) -> int:
    """The largest ``value`` of any sub-server (one that holds no part of the plan gives 0)."""
    out = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return int(out)
