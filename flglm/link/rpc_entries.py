"""The endpoint's call surface over torch RPC: what a client may call, by name.

A client reaches the server's endpoint either through an RRef to the object
:func:`instance` returns, or (dynamic membership) through the module-level functions below.
Both sides import this module, never each other: the server installs its endpoint here, the
client names these functions in its RPC calls. The endpoint is typed against
:class:`EndpointSurface`, so this module knows no server code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch.distributed import rpc
from torch.futures import Future


class EndpointSurface(Protocol):
    """The three calls a client makes on the server's endpoint."""

    def handshake(self, client_id: int, hello: torch.Tensor) -> torch.Tensor: ...

    def exchange(self, client_id: int, kind: str, round_index: int, step: int, tensors: list[torch.Tensor]) -> Future: ...

    def sealed(self, client_id: int, kind: str, message: torch.Tensor) -> Future: ...


ENTRY_NAMES = ("handshake", "exchange", "sealed")
"""The names of the calls of :class:`EndpointSurface`: nothing else of the endpoint is reachable."""

_ENDPOINT: EndpointSurface | None = None


def install(endpoint: EndpointSurface) -> None:
    """Make ``endpoint`` the process's instance that ``rpc.remote(..., instance)`` hands out."""
    global _ENDPOINT
    _ENDPOINT = endpoint


def serving() -> bool:
    """Whether this process serves an endpoint."""
    return _ENDPOINT is not None


def instance() -> EndpointSurface:
    if _ENDPOINT is None:
        raise RuntimeError("no server endpoint is running in this process")
    return _ENDPOINT


# The endpoint as plain functions, for clients of a dynamic federation (no RRef): an RRef's id
# is (creating worker's rank, local counter), so a restarted client creating one under its old
# rank repeats the dead process's id, and the server's RPC agent fails an internal assertion
# ("fork notification twice"; measured with torch 2.13). A function call carries no such id.
def handshake(client_id: int, hello: torch.Tensor) -> torch.Tensor:
    """``handshake`` of this process's endpoint."""
    return instance().handshake(client_id, hello)


@rpc.functions.async_execution
def exchange(client_id: int, kind: str, round_index: int, step: int, tensors: list[torch.Tensor]) -> Future:
    """``exchange`` of this process's endpoint."""
    return instance().exchange(client_id, kind, round_index, step, tensors)


@rpc.functions.async_execution
def sealed(client_id: int, kind: str, message: torch.Tensor) -> Future:
    """``sealed`` of this process's endpoint."""
    return instance().sealed(client_id, kind, message)


ENTRIES: dict[str, Callable[..., Any]] = {"handshake": handshake, "exchange": exchange, "sealed": sealed}
"""What a client may call, by the method name its link uses."""
