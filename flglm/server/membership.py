"""Who belongs to the federation now: joins, restarts, leaves, silent clients dropped, and when it is over.

A client is alive while it sends messages or has one being handled (waiting for its turn or for
a FedAvg round counts); one silent for ``server.client_timeout_s`` is dropped, and the others go
on. The federation is done once every expected client has joined and left (or was dropped),
except that a client dropped less than ``server.rejoin_timeout_s`` ago is still waited for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from flglm.config import ServerConfig
from flglm.link.messages import InvalidMessageError
from flglm.server.stats import ServerStats

log = logging.getLogger("flglm.server")


class Membership:
    """The members of one server (all clients, or a sub-server's).

    Args:
        clients: the client ids this server expects.
        settings: the ``server`` config (timeouts).
        stats: counts dropped clients.
        on_silent: called with (client, reason) for a client that went silent; the server drops it.
    """

    def __init__(self, clients: Sequence[int], settings: ServerConfig, stats: ServerStats, *, on_silent: Callable[[int, str], None]) -> None:
        self.clients = sorted(clients)
        self._settings = settings
        self._stats = stats
        self._on_silent = on_silent
        self._lock = threading.RLock()
        self._alive_lock = threading.Lock()  # intake must never wait behind the membership lock
        self.joined: set[int] = set()
        self.left: set[int] = set()
        self._incarnations: dict[int, int] = {}
        self._tokenizer: str | None = None
        self._last_seen: dict[int, float] = {}
        self._in_flight: dict[int, int] = {}
        self._dropped: set[int] = set()
        self._dropped_at: dict[int, float] = {}
        self._done = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch_silence, name="flglm-client-watchdog", daemon=True)
        self._watchdog.start()

    # ---------------------------------------------------------------------- joining
    def check_tokenizer(self, client_id: int, tokenizer_fingerprint: str) -> None:
        """Every client must tokenize alike: the first join fixes the tokenizer."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = tokenizer_fingerprint
            elif tokenizer_fingerprint != self._tokenizer:
                raise InvalidMessageError(f"client {client_id}: its tokenizer differs from the other clients'")

    def is_connected(self, client_id: int) -> bool:
        with self._lock:
            return client_id in self.joined and client_id not in self.left

    def is_fresh(self, client_id: int, incarnation: int) -> bool:
        """Whether a join is a new process's (not a resend of the connected process's join)."""
        with self._lock:
            return not self.is_connected(client_id) or self._incarnations.get(client_id) != incarnation

    def admit(self, client_id: int, incarnation: int) -> None:
        with self._alive_lock:
            self._last_seen[client_id] = time.monotonic()
        with self._lock:
            self._incarnations[client_id] = incarnation
            self._dropped.discard(client_id)
            self._dropped_at.pop(client_id, None)
            self.joined.add(client_id)
            self.left.discard(client_id)

    def check_member(self, client_id: int, kind: str) -> None:
        """Only a joined client's messages are handled (a resent ``leave`` too, after it left)."""
        if kind == "join":
            return
        with self._lock:
            if client_id in self._dropped and kind != "leave":
                raise InvalidMessageError(
                    f"client {client_id} was dropped after server.client_timeout_s={self._settings.client_timeout_s} without a message; join again"
                )
            if client_id not in self.joined or (client_id in self.left and kind != "leave"):
                raise InvalidMessageError(f"client {client_id} has not joined the federation (or has left): a {kind!r} message needs a join first")

    # -------------------------------------------------------------------- liveness
    def message_begins(self, client_id: int) -> None:
        """A message of ``client_id`` arrived (the endpoint calls this for every message)."""
        with self._alive_lock:
            self._last_seen[client_id] = time.monotonic()
            self._in_flight[client_id] = self._in_flight.get(client_id, 0) + 1

    def message_ends(self, client_id: int) -> None:
        with self._alive_lock:
            self._last_seen[client_id] = time.monotonic()
            self._in_flight[client_id] = max(0, self._in_flight.get(client_id, 0) - 1)

    def _watch_silence(self) -> None:
        timeout = self._settings.client_timeout_s
        while not self._stop.wait(min(1.0, timeout / 4)):
            now = time.monotonic()
            with self._lock:
                members = set(self.joined) - set(self.left)
            with self._alive_lock:
                silent = [c for c in members if not self._in_flight.get(c) and now - self._last_seen.get(c, now) > timeout]
            for client_id in silent:
                self._on_silent(client_id, f"no message for {timeout:.0f}s (server.client_timeout_s)")
            self.finish_if_everyone_left()  # a dropped client's time to join again may have run out

    # -------------------------------------------------------------------- leaving
    def leave(self, client_id: int) -> None:
        with self._lock:
            self.left.add(client_id)

    def drop(self, client_id: int) -> bool:
        """Take a client out of the federation; False if it was not a connected member."""
        with self._lock:
            if client_id in self.left or client_id not in self.joined:
                return False
            self.left.add(client_id)
            self._dropped.add(client_id)
            self._dropped_at[client_id] = time.monotonic()
            self._stats.dropped_clients += 1
            return True

    def finish_if_everyone_left(self) -> None:
        with self._lock:
            now = time.monotonic()
            rejoin = self._settings.rejoin_timeout_s
            awaited = [c for c in self._dropped if now - self._dropped_at.get(c, now) < rejoin]
            if len(self.joined) >= len(self.clients) and self.left >= self.joined and not awaited:
                self._done.set()

    def abort(self, error: BaseException) -> None:
        self.error = error
        self._done.set()

    def wait_until_done(self, *, timeout: float) -> None:
        """Block until every expected client has joined and left; joins are bounded by ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self._done.wait(timeout=1.0):
            if len(self.joined) < len(self.clients) and time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.joined)} of {len(self.clients)} clients joined within server.startup_timeout_s={timeout}")
        if self.error is not None:
            raise RuntimeError(f"the server stopped: {self.error}") from self.error

    def close(self) -> None:
        self._stop.set()
