"""The server's counters: what it handled, refused, freed and skipped (``summary.json``'s ``server``).

Bytes are not counted here: the endpoint counts them once, where messages come in and go out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields


@dataclass
class ServerStats:
    forwards: int = 0
    inferences: int = 0
    decodes: int = 0
    backwards: int = 0
    steps: int = 0
    rejected: int = 0
    evicted: int = 0
    dropped_clients: int = 0
    """Clients dropped after ``server.client_timeout_s`` of silence."""
    freed_pending: int = 0
    """Pending forwards freed because their client was dropped, left, or joined again as a new process."""
    skipped_nonfinite: int = 0
    """Forwards and backwards carrying NaN/Inf that were skipped (``server.nonfinite=skip``)."""
    started: float = field(default_factory=time.monotonic)

    def counters(self) -> dict[str, int]:
        """Every count (what a checkpoint saves), without the start time."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "started"}

    def restore(self, counters: dict[str, int]) -> None:
        for key, value in counters.items():
            if key in self.counters():
                setattr(self, key, value)

    def as_dict(self) -> dict[str, float]:
        return {**self.counters(), "elapsed_s": round(time.monotonic() - self.started, 3)}


def resident_mb() -> float:
    """This process's resident memory in MB (Linux; NaN elsewhere), for the logs and the soak benchmark."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
