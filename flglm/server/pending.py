"""The autograd state of training forwards awaiting their backward, bounded per client and in time."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from flglm.server.stats import ServerStats

log = logging.getLogger("flglm.server")

Key = tuple[int, int]
"""(client id, request id)."""


@dataclass
class Pending:
    """Autograd state of one forward, kept until its backward (or a timeout)."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    prefix: torch.Tensor | None = None
    """P-tuning v2: the prefixes the client sent (their gradient goes back with the inputs')."""
    skipped: bool = False
    """``server.nonfinite=skip``: the forward carried NaN/Inf and never touched the model; its backward is answered with zeros."""
    created: float = field(default_factory=time.monotonic)


class PendingForwards:
    """Pending forwards of every client (not thread-safe: callers hold the compute lock).

    Args:
        timeout_s: a forward whose backward has not come within this time is released (``server.state_timeout_s``).
        per_client: most pending forwards per client; the oldest is evicted (``server.max_pending_per_client``).
    """

    def __init__(self, *, timeout_s: float, per_client: int, stats: ServerStats) -> None:
        self._timeout_s = timeout_s
        self._per_client = per_client
        self._stats = stats
        self._items: OrderedDict[Key, Pending] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Key) -> bool:
        return key in self._items

    def keys(self) -> list[Key]:
        return list(self._items)

    def sweep(self) -> None:
        """Release the forwards whose backward is overdue."""
        now = time.monotonic()
        for key in [k for k, p in self._items.items() if now - p.created > self._timeout_s]:
            del self._items[key]
            self._stats.evicted += 1
            log.warning("released the state of client %d request %d: no backward within %.0fs", *key, self._timeout_s)

    def make_room(self, client_id: int) -> None:
        """Evict the client's oldest forwards beyond its limit."""
        mine = [k for k in self._items if k[0] == client_id]
        while len(mine) >= self._per_client:
            oldest = mine.pop(0)
            del self._items[oldest]
            self._stats.evicted += 1
            log.warning("client %d has too many forwards without backward; evicted request %d", *oldest)

    def add(self, key: Key, pending: Pending) -> None:
        self._items[key] = pending

    def get(self, key: Key) -> Pending | None:
        return self._items.get(key)

    def pop(self, key: Key) -> Pending:
        return self._items.pop(key)

    def drop_client(self, client_id: int | None) -> int:
        """Free a client's pending forwards; how many there were."""
        keys = [k for k in self._items if k[0] == client_id]
        for key in keys:
            del self._items[key]
        return len(keys)
