"""The edge and the socket transport in one process (real sockets on loopback): a lost connection is
a TransportError that ServerLink's resend recovers from, refusals come back as exceptions, and
the socket link's settings are checked."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch.futures import Future

from flglm.client.server_link import ServerLink
from flglm.config import ConfigError, RunConfig
from flglm.link.messages import InvalidMessageError
from flglm.link.socket_transport import SocketTransport
from flglm.link.transport import RetryPolicy, TransportError
from flglm.server.edge import Edge


class _Endpoint:
    """Answers ``exchange`` with its tensors doubled, refuses kind ``leave``; counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def handshake(self, client_id: int, hello: torch.Tensor) -> torch.Tensor:
        raise InvalidMessageError("no handshakes here")

    def exchange(self, client_id: int, kind: str, round_index: int, step: int, tensors: list[torch.Tensor]) -> Future:
        self.calls += 1
        future: Future = Future()
        if kind == "leave":
            future.set_exception(InvalidMessageError(f"client {client_id}: refused"))
        else:
            future.set_result([t * 2 for t in tensors])
        return future

    def sealed(self, client_id: int, kind: str, message: torch.Tensor) -> Future:
        raise AssertionError("not used")


@pytest.fixture
def edge() -> Iterator[tuple[Edge, _Endpoint]]:
    endpoint = _Endpoint()
    edge = Edge(
        endpoint, host="127.0.0.1", port=0, encrypted=False, max_frame_bytes=1 << 24, first_frame_timeout_s=5,
        call_timeout_s=10, max_connections=8, max_connections_per_client=2,
    )  # fmt: skip
    edge.start()
    yield edge, endpoint
    edge.close(wait_s=1)


def _link(edge: Edge) -> ServerLink:
    transport = SocketTransport(*edge.address, timeout_s=5, max_frame_bytes=1 << 24)
    return ServerLink(transport, client_id=0, timeout_s=5, retry=RetryPolicy(max_retries=2, backoff_s=0.01))


def test_answers_and_refusals_cross_the_edge(edge: tuple[Edge, _Endpoint]) -> None:
    link = _link(edge[0])
    hidden = torch.randn(2, 3, 8).bfloat16()
    (out,) = link.exchange("forward", [hidden], step=4)
    assert out.dtype == torch.bfloat16 and torch.equal(out, hidden * 2)
    with pytest.raises(InvalidMessageError, match="client 0: refused"):
        link.exchange("leave", [])
    assert link.retries == 0  # a refusal is an answer, not a loss


def test_a_dropped_connection_is_resent_over_a_new_one(edge: tuple[Edge, _Endpoint]) -> None:
    server, endpoint = edge
    link = _link(server)
    link.exchange("step", [torch.ones(1)])
    for conn in list(server._connections):  # the server side closes the connection between two calls
        server._drop(conn, "test")
    (out,) = link.exchange("step", [torch.ones(1)], step=1)
    assert torch.equal(out, torch.full((1,), 2.0))
    assert link.retries == 1 and link.transport.connects == 2 and endpoint.calls == 2


def test_a_server_that_is_gone_is_a_transport_error(edge: tuple[Edge, _Endpoint]) -> None:
    server, _ = edge
    transport = SocketTransport(*server.address, timeout_s=2, max_frame_bytes=1 << 20)
    transport.call("exchange", 0, "step", 0, 0, [])
    server.close(wait_s=0)
    with pytest.raises(TransportError, match="edge"):
        transport.call("exchange", 0, "step", 0, 1, [])
    with pytest.raises(ValueError, match="only"):
        transport.call("instance")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["link.transport=socket", "federation.membership=dynamic"], "membership=static"),
        (["link.transport=tcp"], "link.transport"),
        (["link.edge_port=70000"], "link.edge_port"),
        (["link.max_connections=0"], "link.max_connections"),
    ],
)
def test_socket_link_settings_are_checked(
    make_run_config: Callable[..., RunConfig], tiny_model_configs: dict, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_run_config(tiny_model_configs["glm"], *overrides)
