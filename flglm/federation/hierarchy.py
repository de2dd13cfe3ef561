"""Hierarchical serving: keeps the sub-servers' replicas of the middle stack in step.

Each sub-server trains its own replica of the middle stack with its own clients. They meet at
the federation's FedAvg rounds, with collectives over the process group of the server ranks
(``flglm.distributed.init_server_group``), never over RPC:

- the client blocks are averaged over *all* clients: each sub-server contributes the sums
  (Σ w·x, Σ x, Σ w, n) of its own clients' uploads, one all-reduce adds them, and every
  sub-server answers its clients with the global FedAvg;
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

log = logging.getLogger("flglm.hierarchy")


@dataclass
class _LocalRound:
    round_index: int
    vectors: list[torch.Tensor]
    weights: list[float]
    future: Future


class _Done:
    """This sub-server's clients have all left."""


class SubServerSync:
    """One sub-server's side of the synchronisation (see the module docstring).

    Args:
        params: the replica's trainable middle-stack parameters (averaged in place).
        lock: the server's lock; held while the parameters are read or written.
        sync_every: average the middle stacks every this many FedAvg rounds.
        on_error: called with the exception if a collective fails (the server aborts).
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        lock: threading.RLock,
        *,
        sync_every: int,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self._params = list(params)
        self._lock = lock
        self._sync_every = sync_every
        self._on_error = on_error
        self._events: queue.Queue[_LocalRound | _Done] = queue.Queue()
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
        future: Future = Future()
        if self.error is not None:
            future.set_exception(self.error)
        else:
            self._events.put(_LocalRound(round_index, vectors, weights, future))
        return future

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
        event: _LocalRound | _Done | None = None
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

    def _collective(self, event: _LocalRound | None) -> bool:
        """One step of the lock-step protocol; False once every sub-server is done."""
        size = event.vectors[0].numel() if event is not None else 0
        header = torch.tensor([1 if event is not None else 0, event.round_index if event else -1, size], dtype=torch.int64)
        headers = [torch.zeros(3, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(headers, header)
        active = [h for h in headers if h[0] == 1]
        if not active:
            self._sync_middle(final=True)
            return False
        rounds = sorted({int(h[1]) for h in active})
        sizes = sorted({int(h[2]) for h in active})
        if len(rounds) > 1 or len(sizes) > 1:
            raise RuntimeError(
                f"sub-servers out of step: active sub-servers are at FedAvg rounds {rounds} with upload sizes "
                f"{sizes}; every client must run the same number of aggregation rounds per epoch"
            )
        round_index, numel = rounds[0], sizes[0]
        average = self._reduce_round(event, numel)
        if (round_index + 1) % self._sync_every == 0:
            self._sync_middle(final=False)
        self.rounds += 1
        if event is not None:
            event.future.set_result(average.to(event.vectors[0].dtype))
        return True

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
                offset = 0
                with torch.no_grad():
                    for p in self._params:
                        p.copy_(average[offset : offset + p.numel()].view_as(p))
                        offset += p.numel()
        self.middle_syncs += 1
        log.info("middle stacks averaged over %d sub-servers (%s, %.0f samples)", self.size, "final" if final else "round", total)

    def _fail_pending(self, err: BaseException, current: _LocalRound | _Done | None) -> None:
        pending = [current] if isinstance(current, _LocalRound) else []
        while True:
            try:
                pending.append(self._events.get_nowait())  # type: ignore[arg-type]
            except queue.Empty:
                break
        for event in pending:
            if isinstance(event, _LocalRound) and not event.future.done():
                event.future.set_exception(RuntimeError(f"sub-server synchronisation failed: {err}"))
