"""Which process does what: decided in one place, from the rank.

Rank 0 is the server; ranks 1..N are clients 0..N-1. RPC worker names follow the roles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SERVER_NAME = "server"


@dataclass(frozen=True)
class Role:
    kind: Literal["server", "client"]
    client_index: int | None = None

    @property
    def worker_name(self) -> str:
        return SERVER_NAME if self.kind == "server" else f"client{self.client_index}"


def role_for_rank(rank: int, world_size: int, *, num_clients: int) -> Role:
    """Map a rank to its role; the world must hold exactly one server and ``num_clients`` clients."""
    if world_size != num_clients + 1:
        raise ValueError(
            f"federation.num_clients={num_clients} needs {num_clients + 1} processes "
            f"(1 server + {num_clients} clients), torchrun started {world_size}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return Role("server") if rank == 0 else Role("client", client_index=rank - 1)
