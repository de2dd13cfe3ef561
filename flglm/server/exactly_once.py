"""Exactly-once handling of messages that change the server's state.

A client resends a message whose answer it did not get (the message or its answer was lost),
and a network may deliver one twice. Every state-changing message of a client carries a key
that no other message of that client carries — its kind, round and step (the request id of a
forward, backward or decoding step, the optimizer step's index, the aggregation round and
attempt) — and a client has one message in flight at a time. So the server keeps, per client,
the key and answer of the latest message: a copy of it is answered with that answer (waiting
for it if the first copy is still being handled), and a copy of an older message is refused
(its sender already has its answer). Nothing is applied twice.

Reads that change nothing (``infer``, ``grad_norms``) and ``join`` (a client's incarnation
decides, see ``MiddleServer.hello``) are not recorded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.futures import Future

from flglm.link.messages import InvalidMessageError

RECORDED_KINDS = frozenset({"forward", "backward", "backward_step", "step", "decode", "decode_end", "agg_begin", "agg_upload", "leave"})
"""Message kinds whose second delivery must not be applied again."""

Key = tuple[str, int, int]
"""(kind, round, step) of a message."""


@dataclass
class RecordStats:
    duplicates: int = 0
    """Copies answered from the record."""
    stale: int = 0
    """Copies of older messages refused."""


class ReplyRecord:
    """The latest answer of each client, and the keys of its older messages.

    Args:
        remember: how many older keys per client are kept to recognise late copies.
    """

    def __init__(self, *, remember: int = 4096) -> None:
        self._remember = remember
        self._lock = threading.Lock()
        self._latest: dict[int, tuple[Key, Future]] = {}
        self._older: dict[int, OrderedDict[Key, None]] = {}
        self.stats = RecordStats()

    def answer(self, client_id: int, key: Key, handle: Callable[[], Future]) -> Future:
        """The answer to message ``key`` of ``client_id``: from the record, or by calling ``handle`` once.

        A refusal known now (``handle`` raised, or the recorded answer is one) is raised, not
        returned as a failed future, so the caller passes it on as itself."""
        if key[0] not in RECORDED_KINDS:
            return handle()
        with self._lock:
            latest = self._latest.get(client_id)
            if latest is not None and latest[0] == key:
                self.stats.duplicates += 1
                if latest[1].done():
                    latest[1].wait()  # a refusal is raised again, as itself
                return latest[1]
            older = self._older.setdefault(client_id, OrderedDict())
            if key in older:
                self.stats.stale += 1
                raise InvalidMessageError(f"client {client_id}: {key[0]} (round {key[1]}, step {key[2]}) was answered before; a late copy is ignored")
            if latest is not None:
                older[latest[0]] = None
            answer: Future = Future()
            self._latest[client_id] = (key, answer)
        try:
            result = handle()
        except Exception as exc:
            # Refused before anything changed: not recorded, so the message before it stays the one
            # a resend matches, and a corrected message with this key is handled normally. A copy
            # already waiting on it gets the same refusal.
            with self._lock:
                if self._latest.get(client_id, (None, None))[1] is answer:
                    if latest is None:
                        self._latest.pop(client_id, None)
                    else:
                        self._latest[client_id] = latest
                        older.pop(latest[0], None)
            answer.set_exception(exc)
            raise
        with self._lock:
            while len(older) > self._remember:
                older.popitem(last=False)
        result.add_done_callback(lambda done: _settle(answer, done))
        return answer

    def forget(self, client_id: int) -> None:
        """A client (re)joined as a new process: its message keys start over."""
        with self._lock:
            self._latest.pop(client_id, None)
            self._older.pop(client_id, None)

    def answers_held(self) -> int:
        with self._lock:
            return len(self._latest)


def _settle(answer: Future, done: torch._C.Future) -> None:
    try:
        answer.set_result(done.wait())
    except Exception as exc:  # noqa: BLE001
        answer.set_exception(exc)
