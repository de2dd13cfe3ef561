"""How a client's messages reach the server, and what happens when they do not.

A :class:`Transport` makes one call on the server's endpoint (``exchange``, ``handshake`` or
``sealed``) and returns its answer. :class:`RpcTransport` goes through torch RPC with the
configured timeout; :class:`LocalTransport` calls an in-process endpoint (tests, benchmarks).
A failure of the transport itself (timeout, refused or reset connection) raises
:class:`TransportError`; the server's own refusal of a message is an ordinary answer (its
exception), never a transport error, and is not retried.

:class:`FaultyTransport` wraps another transport and loses requests, loses replies and
delivers requests twice at random, deterministically by seed. It is how the exactly-once
protocol is tested: a run through it must end exactly as a clean run.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.distributed.rpc import PyRRef

log = logging.getLogger("flglm.client")


class TransportError(ConnectionError):
    """The message or its answer was lost (timeout, refused or reset connection); it may be resent."""


class Transport(Protocol):
    def call(self, method: str, *args: Any) -> Any:
        """Call ``method`` of the server's endpoint; its answer, or the exception it answered with."""
        ...


def _resolved(result: Any) -> Any:
    # ``Future.then`` gives the C++ base class, not ``torch.futures.Future``.
    return result.wait() if isinstance(result, torch._C.Future) else result


class LocalTransport:
    """Calls an endpoint in this process; the endpoint's refusals come back as exception objects, like RPC's."""

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint

    def call(self, method: str, *args: Any) -> Any:
        try:
            return _resolved(getattr(self.endpoint, method)(*args))
        except Exception as exc:  # noqa: BLE001 - the server's answer, as RPC delivers it
            return exc


class RpcTransport:
    """Calls the server's endpoint through an RRef, each call bounded by ``timeout_s``."""

    def __init__(self, rref: PyRRef, *, timeout_s: float) -> None:
        self.rref = rref
        self.timeout_s = timeout_s

    def call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.rref.rpc_sync(timeout=self.timeout_s), method)(*args)
        except RuntimeError as exc:
            # Measured: an exception the server answers with comes back as the exception object
            # itself (the endpoint completes its future with it); what RPC raises is the transport's.
            raise TransportError(f"{method} to the server failed: {exc}") from exc


class RpcFunctionTransport:
    """Calls the server's endpoint through module-level functions (``flglm.link.rpc_entries.ENTRIES``),
    each call bounded by ``timeout_s``: the transport of a dynamic federation, where a client
    process may be restarted under its old rank (no RRef, whose id would repeat the old process's)."""

    def __init__(self, server_name: str, *, timeout_s: float) -> None:
        self.server_name = server_name
        self.timeout_s = timeout_s

    def call(self, method: str, *args: Any) -> Any:
        from torch.distributed import rpc

        from flglm.link.rpc_entries import ENTRIES

        try:
            return rpc.rpc_sync(self.server_name, ENTRIES[method], args=args, timeout=self.timeout_s)
        except RuntimeError as exc:
            raise TransportError(f"{method} to the server failed: {exc}") from exc


def as_transport(target: Any, *, timeout_s: float) -> Transport:
    """An RRef, an endpoint object or a transport, as a transport."""
    if isinstance(target, PyRRef):
        return RpcTransport(target, timeout_s=timeout_s)
    if hasattr(target, "call"):
        return target
    return LocalTransport(target)


@dataclass
class FaultCounts:
    calls: int = 0
    dropped_requests: int = 0
    dropped_replies: int = 0
    duplicated: int = 0


class FaultyTransport:
    """Loses and duplicates messages at random, deterministically by ``seed``.

    Per call, with the given probabilities: the request is lost before the server sees it; the
    server handles it but the answer is lost; or the server receives it twice (the client gets
    the first answer, as a network that duplicates a packet would deliver). Handshakes are
    subject to the same faults. ``limit`` bounds consecutive faults so a run always progresses.
    """

    def __init__(
        self,
        inner: Transport,
        *,
        seed: int,
        drop_request: float = 0.0,
        drop_reply: float = 0.0,
        duplicate: float = 0.0,
        limit: int = 2,
    ) -> None:
        for name, p in (("drop_request", drop_request), ("drop_reply", drop_reply), ("duplicate", duplicate)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if drop_request + drop_reply + duplicate > 1.0:
            raise ValueError("drop_request + drop_reply + duplicate must not exceed 1")
        self.inner = inner
        self.drop_request, self.drop_reply, self.duplicate = drop_request, drop_reply, duplicate
        self.limit = limit
        self.counts = FaultCounts()
        self._random = random.Random(seed)
        self._in_a_row = 0

    def call(self, method: str, *args: Any) -> Any:
        self.counts.calls += 1
        draw = self._random.random()
        if self._in_a_row >= self.limit:
            draw = 1.0
        if draw < self.drop_request:
            self._in_a_row += 1
            self.counts.dropped_requests += 1
            raise TransportError(f"fault injection: {method} request lost")
        if draw < self.drop_request + self.drop_reply:
            self._in_a_row += 1
            self.counts.dropped_replies += 1
            self.inner.call(method, *args)
            raise TransportError(f"fault injection: answer to {method} lost")
        self._in_a_row = 0
        answer = self.inner.call(method, *args)
        if draw < self.drop_request + self.drop_reply + self.duplicate:
            self.counts.duplicated += 1
            self.inner.call(method, *args)  # the copy's answer goes nowhere
        return answer


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a lost message is resent: exponential backoff, bounded."""

    max_retries: int = 3
    backoff_s: float = 0.5
    backoff_max_s: float = 10.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before resend number ``attempt`` (0-based)."""
        return min(self.backoff_max_s, self.backoff_s * 2.0**attempt)
