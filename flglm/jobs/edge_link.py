"""The socket link's two ends as jobs see them: the server's edge for the run, a client's link to it.

Neither end starts torch RPC: the server's only listening socket is its edge, and a client
opens one outgoing connection and accepts none.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flglm.config import RunConfig
from flglm.link.socket_transport import SocketTransport
from flglm.roles import Role
from flglm.run_layout import edge_address_path
from flglm.server.edge import Edge
from flglm.server.endpoint import ServerEndpoint
from flglm.tensor_files import write_json

log = logging.getLogger("flglm")


def max_frame_bytes(cfg: RunConfig) -> int:
    return int(cfg.link.max_frame_mb * 2**20)


@contextmanager
def serving_edge(cfg: RunConfig, endpoint: ServerEndpoint, role: Role, *, address_path: Path | None = None) -> Iterator[Edge]:
    """The server's edge for the block's duration; its address goes to ``address_path`` (default
    ``run_dir/edge.json``, ``edge-i.json`` for sub-server ``i``). On the way out it lets the last
    answers (``leave``) be written before it closes."""
    link = cfg.link
    edge = Edge(
        endpoint,
        host=link.edge_host,
        port=link.edge_port,
        encrypted=cfg.crypto.enabled,
        max_frame_bytes=max_frame_bytes(cfg),
        first_frame_timeout_s=link.first_frame_timeout_s,
        call_timeout_s=cfg.server.rpc_timeout_s,
        max_connections=link.max_connections,
        max_connections_per_client=link.max_connections_per_client,
    )
    host, port = edge.start()
    if not cfg.crypto.enabled:
        log.warning("%s: the edge runs WITHOUT encryption: anyone who reaches %s:%d can take part", role.worker_name, host, port)
    path = address_path or edge_address_path(cfg.run_dir, role.server_index)
    write_json({"host": host, "port": port}, path)
    log.info("%s: edge at %s:%d (written to %s)", role.worker_name, host, port, path)
    try:
        yield edge
    except BaseException:
        log.exception("%s failed", role.worker_name)
        raise
    finally:
        edge.close(wait_s=min(30.0, cfg.server.rpc_timeout_s))


def edge_transport(cfg: RunConfig, address: tuple[str, int]) -> SocketTransport:
    """A connected transport to the server's edge (waits up to ``server.startup_timeout_s`` for it)."""
    transport = SocketTransport(address[0], address[1], timeout_s=cfg.server.rpc_timeout_s, max_frame_bytes=max_frame_bytes(cfg))
    transport.wait_until_reachable(cfg.server.startup_timeout_s)
    return transport


def published_address(path: Path, *, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> tuple[str, int]:
    """The edge address a server wrote to ``path`` (it may still be starting: wait up to ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline or not alive():
            raise TimeoutError(f"no edge address at {path} within {timeout_s:g}s: did the server start?")
        time.sleep(0.1)
    address = json.loads(path.read_text())
    return str(address["host"]), int(address["port"])


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[IPv6]:PORT``) as a pair; raises ValueError naming the problem."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--server must be HOST:PORT (the server writes its edge's to run_dir/edge.json), got {text!r}")
    return host.strip("[]"), int(port)
