"""Sequential serving's turn: one client's training step (forwards, backwards, optimizer step) at a time."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("flglm.server")


class TurnTaking:
    """Who holds the middle stack for a training step; a holder silent past ``timeout_s`` loses it.

    Args:
        timeout_s: how long a turn may be held (``server.state_timeout_s``).
        on_stale: called with the client whose turn was taken away (its half-done step is discarded there).
    """

    def __init__(self, *, timeout_s: float, on_stale: Callable[[int | None], None]) -> None:
        self._timeout_s = timeout_s
        self._on_stale = on_stale
        self._turn = threading.Condition()
        self._owner: int | None = None
        self._since = 0.0

    def acquire(self, client_id: int) -> None:
        with self._turn:
            while self._owner not in (None, client_id):
                if time.monotonic() - self._since > self._timeout_s:
                    log.warning("client %s held the server for over %.0fs; releasing its turn", self._owner, self._timeout_s)
                    self._on_stale(self._owner)
                    break
                self._turn.wait(timeout=0.5)
            if self._owner != client_id:
                self._owner = client_id
                self._since = time.monotonic()

    def release(self, client_id: int) -> bool:
        """Hand the turn on if ``client_id`` holds it; whether it did."""
        with self._turn:
            if self._owner != client_id:
                return False
            self._owner = None
            self._turn.notify_all()
            return True
