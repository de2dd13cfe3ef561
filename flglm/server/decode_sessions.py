"""The server's side of generation: one key/value cache of the middle stack per decoding session.

A client generating text through the split keeps the caches of its own blocks; the server
keeps those of the middle stack, so each new token costs one hidden state each way instead
of the whole sequence. A session is named by (client id, session number) and lives until the
client ends it, leaves, opens more than ``server.max_decode_sessions_per_client`` sessions
(least recently used freed first), or leaves it idle for ``server.state_timeout_s``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from transformers import DynamicCache, PretrainedConfig

from flglm.link.messages import InvalidMessageError

log = logging.getLogger("flglm.server")


@dataclass
class DecodeSession:
    """One session's cache and how many tokens of each row it holds."""

    cache: DynamicCache
    batch: int
    length: int = 0
    """Tokens cached per row (not counting a P-tuning prefix)."""
    prefix_length: int = 0
    """Positions of the cache a P-tuning v2 prefix takes (in front of the tokens)."""
    last_used: float = field(default_factory=time.monotonic)


class DecodeSessions:
    """Open decoding sessions of every client of a server (not thread-safe: callers hold the server lock)."""

    def __init__(self, config: PretrainedConfig, *, max_per_client: int, idle_timeout_s: float) -> None:
        self._config = config
        self._max_per_client = max_per_client
        self._idle_timeout_s = idle_timeout_s
        self._sessions: OrderedDict[tuple[int, int], DecodeSession] = OrderedDict()
        self.opened = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def session_for(self, client_id: int, session: int, *, past: int, batch: int) -> DecodeSession:
        """The session a decode request continues (``past`` tokens already cached), or a new one (``past == 0``).

        Raises:
            InvalidMessageError: the request does not continue the session the server holds
                (unknown session, wrong number of cached tokens, or another batch size).
        """
        self.sweep()
        key = (client_id, session)
        who = f"client {client_id} decoding session {session}"
        entry = self._sessions.get(key)
        if entry is None:
            if past != 0:
                raise InvalidMessageError(
                    f"{who}: the server holds no cache for it (ended, or freed after server.state_timeout_s "
                    f"idle or by newer sessions); start the generation again"
                )
            self._make_room(client_id)
            entry = self._sessions[key] = DecodeSession(DynamicCache(config=self._config), batch)
            self.opened += 1
        elif past != entry.length or batch != entry.batch:
            raise InvalidMessageError(
                f"{who}: the request continues {past} cached token(s) of {batch} row(s), the server's cache holds {entry.length} of {entry.batch}"
            )
        entry.last_used = time.monotonic()
        self._sessions.move_to_end(key)
        return entry

    def end(self, client_id: int, session: int) -> None:
        """Free a session (unknown sessions are ignored: it may have timed out already)."""
        self._sessions.pop((client_id, session), None)

    def drop_client(self, client_id: int) -> None:
        for key in [k for k in self._sessions if k[0] == client_id]:
            del self._sessions[key]

    def sweep(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self._sessions.items() if now - s.last_used > self._idle_timeout_s]:
            del self._sessions[key]
            self.evicted += 1
            log.warning("freed client %d decoding session %d: idle for over %.0fs", *key, self._idle_timeout_s)

    def _make_room(self, client_id: int) -> None:
        mine = [k for k in self._sessions if k[0] == client_id]  # least recently used first
        while len(mine) >= self._max_per_client:
            oldest = mine.pop(0)
            del self._sessions[oldest]
            self.evicted += 1
            log.warning("client %d opened more than %d decoding sessions; freed session %d", oldest[0], self._max_per_client, oldest[1])

    def stats(self) -> dict[str, int]:
        return {"decode_sessions_opened": self.opened, "decode_sessions_evicted": self.evicted}
