"""Which process does what: decided in one place, from the rank.

Ranks ``0..S-1`` are the server's processes (``S = server.sub_servers``; one unless the server
is hierarchical), ranks ``S..S+N-1`` are clients ``0..N-1``. Client ``i`` is served by
sub-server ``i % S``. Rank 0 also coordinates: it writes the federation's summary and model.
RPC worker names follow the roles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SERVER_NAME = "server"


def server_name(index: int) -> str:
    """RPC name of sub-server ``index`` (sub-server 0 is the plain server of a one-server federation)."""
    return SERVER_NAME if index == 0 else f"{SERVER_NAME}{index}"


def clients_of(server_index: int, *, num_clients: int, sub_servers: int) -> list[int]:
    """The clients sub-server ``server_index`` serves."""
    return [i for i in range(num_clients) if i % sub_servers == server_index]


@dataclass(frozen=True)
class Role:
    kind: Literal["server", "client"]
    client_index: int | None = None
    server_index: int = 0
    """A server process: which sub-server it is. A client: which sub-server serves it."""
    sub_servers: int = 1

    @property
    def worker_name(self) -> str:
        return server_name(self.server_index) if self.kind == "server" else f"client{self.client_index}"

    @property
    def server_name(self) -> str:
        """The RPC name of the server process this role talks to (itself for a server)."""
        return server_name(self.server_index)

    @property
    def is_coordinator(self) -> bool:
        """Writes the summary and the final middle stack."""
        return self.kind == "server" and self.server_index == 0


def role_for_rank(rank: int, world_size: int, *, num_clients: int, sub_servers: int = 1) -> Role:
    """Map a rank to its role; the world must hold exactly ``sub_servers`` servers and ``num_clients`` clients."""
    if world_size != num_clients + sub_servers:
        servers = "1 server" if sub_servers == 1 else f"{sub_servers} sub-servers"
        raise ValueError(
            f"federation.num_clients={num_clients} with server.sub_servers={sub_servers} needs "
            f"{num_clients + sub_servers} processes ({servers} + {num_clients} clients), torchrun started {world_size}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    if rank < sub_servers:
        return Role("server", server_index=rank, sub_servers=sub_servers)
    client = rank - sub_servers
    return Role("client", client_index=client, server_index=client % sub_servers, sub_servers=sub_servers)


def edge_server_role(rank: int, world_size: int, *, sub_servers: int = 1) -> Role:
    """A server process of a socket-link federation: its clients are not processes of its world,
    so the world is the server's own processes (one, or ``sub_servers`` under torchrun)."""
    if world_size != sub_servers or not 0 <= rank < world_size:
        wanted = "one process (rank 0 of 1)" if sub_servers == 1 else f"server.sub_servers={sub_servers} processes under torchrun"
        raise ValueError(f"link.transport=socket: start the server as {wanted}, got rank {rank} of {world_size}")
    return Role("server", server_index=rank, sub_servers=sub_servers)


def edge_client_role(client_index: int, *, num_clients: int) -> Role:
    """Client ``client_index`` of a socket-link federation, started on its own (no rank)."""
    if not 0 <= client_index < num_clients:
        raise ValueError(f"client {client_index} is not one of the federation's clients 0..{num_clients - 1}")
    return Role("client", client_index=client_index)


def generation_role(rank: int, world_size: int, *, client_index: int, num_clients: int) -> Role:
    """Roles of a generation job (``flglm generate``): rank 0 serves the middle stack, rank 1 is
    client ``client_index`` with the prompts. One server even if training was hierarchical: the
    sub-servers' replicas are equal after the final synchronisation."""
    if world_size != 2:
        raise ValueError(f"a generation job runs 2 processes (server + one client), torchrun started {world_size}")
    if not 0 <= client_index < num_clients:
        raise ValueError(f"client {client_index} is not one of the federation's clients 0..{num_clients - 1}")
    if rank == 0:
        return Role("server")
    if rank == 1:
        return Role("client", client_index=client_index)
    raise ValueError(f"rank {rank} outside world of size {world_size}")
