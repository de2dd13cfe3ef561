"""The one place that reads the distributed environment (torchrun's, or set by hand), starts
RPC, and sets threads.

Everything else takes a ``DistEnv`` argument. Two ways to start a federation: torchrun starts
every process and RPC has a fixed world (``federation.membership=static``), or each process is
started on its own with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set by hand and joins
RPC's dynamic group (``dynamic``), so a client process can die and come back while the others
go on.

Measured on a 2-core machine: two processes that each use every core run 30-60x slower than
with one thread each (OpenMP spin-waits on a busy core), so each process of a federation takes
its share of the cores.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.distributed import rpc

from flglm.link import rpc_allowlist

log = logging.getLogger("flglm")

_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_DYNAMIC_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    restart_count: int = 0
    """How many times torchrun restarted the federation's processes (``--max-restarts``)."""
    dynamic: bool = False
    """Joins RPC's dynamic group (``federation.membership=dynamic``): started on its own, not by torchrun."""
    agent_store: bool = False
    """torchrun's agent hosts a store at MASTER_ADDR:MASTER_PORT (it listens on every address of that machine)."""


def read_env(environ: Mapping[str, str] | None = None, *, dynamic: bool = False) -> DistEnv:
    """Read the distributed variables; raises naming the missing ones.

    Under torchrun (``dynamic=False``) all of torchrun's variables must be set. A process of a
    dynamic federation needs RANK (its role), WORLD_SIZE (the federation's size, to check the
    roles), MASTER_ADDR and MASTER_PORT (the server's rendezvous store; the server may give 0:
    a free port, written to ``run_dir/rendezvous.json``); LOCAL_WORLD_SIZE, the federation's
    processes on this machine, defaults to WORLD_SIZE (all of them: the safe guess for threads).
    """
    environ = os.environ if environ is None else environ
    missing = [k for k in (_DYNAMIC_KEYS if dynamic else _TORCHRUN_KEYS) if k not in environ]
    if missing and dynamic:
        raise RuntimeError(
            f"federation.membership=dynamic: set {', '.join(missing)} for this process, e.g. "
            "`RANK=1 WORLD_SIZE=3 MASTER_ADDR=127.0.0.1 MASTER_PORT=<the port in run_dir/rendezvous.json> python launch/train.py ...` "
            "(the server, RANK=0, takes MASTER_PORT=0: a free port, written there)"
        )
    if missing:
        raise RuntimeError(
            f"not started by torchrun (missing {', '.join(missing)}); run e.g. "
            "`torchrun --nproc-per-node=3 launch/train.py --config configs/demo.yaml`"
        )

    def number(key: str, default: str | None = None) -> int:
        raw = environ.get(key, default)
        try:
            value = int(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise RuntimeError(f"environment variable {key}={raw!r} is not an integer") from None
        if value < 0:
            raise RuntimeError(f"environment variable {key}={value} must be >= 0")
        return value

    world_size = number("WORLD_SIZE")
    return DistEnv(
        rank=number("RANK"),
        world_size=world_size,
        local_rank=number("LOCAL_RANK", environ.get("RANK")),
        local_world_size=number("LOCAL_WORLD_SIZE", str(world_size)),
        master_addr=environ["MASTER_ADDR"],
        master_port=number("MASTER_PORT"),
        restart_count=number("TORCHELASTIC_RESTART_COUNT", "0"),
        dynamic=dynamic,
        agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
    )


def launched_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process was started as one rank of a distributed job (torchrun, or RANK set by hand)."""
    return "RANK" in (os.environ if environ is None else environ)


def read_server_env(
    environ: Mapping[str, str] | None = None, *, sub_server: int | None = None, cluster: str | None = None, sub_servers: int = 1
) -> DistEnv:
    """The server of a socket-link federation: one process on its own (it needs no rendezvous:
    its clients reach its edge); or sub-server ``sub_server`` of ``sub_servers``, started on its
    own (``flglm train --sub-server I --cluster HOST:PORT``), meeting the others at ``cluster``,
    a store that sub-server 0 hosts on that address only (:func:`init_server_group`); or, under
    torchrun, torchrun's variables."""
    environ = os.environ if environ is None else environ
    if sub_server is not None or cluster is not None:
        if "RANK" in environ:
            raise RuntimeError("--sub-server/--cluster start a sub-server on its own: not under torchrun (RANK is set)")
        if sub_server is None or cluster is None:
            raise RuntimeError("a sub-server started on its own needs both --sub-server I and --cluster HOST:PORT")
        if not 0 <= sub_server < sub_servers:
            raise RuntimeError(f"--sub-server {sub_server} is not one of server.sub_servers={sub_servers} (0..{sub_servers - 1})")
        host, _, port = cluster.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RuntimeError(f"--cluster {cluster!r} is not HOST:PORT (sub-server 0's address on the sub-servers' own network, a port 1-65535)")
        return DistEnv(
            rank=sub_server,
            world_size=sub_servers,
            local_rank=sub_server,
            local_world_size=sub_servers,
            master_addr=host.strip("[]"),
            master_port=int(port),
        )
    if "RANK" in environ:
        return read_env(environ)
    return DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="", master_port=0)


def threads_per_process(processes_on_this_machine: int, cores: int | None = None) -> int:
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, processes_on_this_machine))


def configure_threads(processes_on_this_machine: int, requested: int = 0) -> int:
    """Give this process its share of the machine's cores (or ``requested`` threads); returns the count."""
    n = requested or threads_per_process(processes_on_this_machine)
    torch.set_num_threads(n)
    return n


def rpc_options(*, num_worker_threads: int, timeout_s: float) -> rpc.TensorPipeRpcBackendOptions:
    """TensorPipe over TCP (``uv``) only, rendezvous through torchrun's store (``env://``).

    TensorPipe's shared-memory transport busy-polls: measured here, its reactor thread kept
    a core ~75% busy in each process, which on a 2-core machine slowed the split step by
    20-30%; plain TCP over loopback costs a few milliseconds per 1 MB crossing instead.
    """
    return rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=num_worker_threads,
        rpc_timeout=timeout_s,
        init_method="env://",
        _transports=["uv"],
        _channels=["basic"],
    )


@contextmanager
def rpc_worker(
    name: str, env: DistEnv, options: rpc.TensorPipeRpcBackendOptions, *, what: str, startup_timeout_s: float | None = None
) -> Iterator[None]:
    """This process is RPC worker ``name`` for the block's duration.

    Static (torchrun): on success RPC shuts down gracefully (waiting for every worker). On
    failure the error is logged (as ``what`` failed), RPC shuts down at once — a graceful
    shutdown would wait for the other workers, which torchrun stops instead — and the error
    propagates.

    Dynamic: rank 0 (the server) hosts the rendezvous store and stays in the group's member
    list; a client takes itself off that list as soon as it has joined (see
    :func:`_leave_member_list`), and every process shuts down locally (``graceful=False``): a
    graceful leave of a dynamic group calls every member, and one dead member makes it fail
    with the group's lock held, which blocks every later join. The server only shuts down once
    it has answered every message (:func:`wait_until_answered`). The store is found at
    ``tcp://MASTER_ADDR:MASTER_PORT`` (port 0 on the server: a free one, see :func:`store_port`).
    """
    if env.dynamic:
        # tcp://, not env://: env:// reads WORLD_SIZE, and a store started for a known world size
        # waits for that many processes to connect before it answers anyone.
        options.init_method = f"tcp://{env.master_addr}:{env.master_port}"
        if env.rank != 0:
            wait_for_server_store(env, timeout_s=startup_timeout_s or options.rpc_timeout, what=what)
    rpc_allowlist.install()  # before the agent starts: no payload is ever unpickled without it
    rpc.init_rpc(name, rank=env.rank, world_size=None if env.dynamic else env.world_size, rpc_backend_options=options)
    try:
        if env.dynamic and env.rank != 0:
            _leave_member_list(name, env.rank, timeout_s=options.rpc_timeout)
        yield
    except BaseException:
        log.exception("%s failed", what)
        rpc.shutdown(graceful=False)
        raise
    rpc.shutdown(graceful=not env.dynamic)


def wait_for_server_store(env: DistEnv, *, timeout_s: float, what: str) -> None:
    """Connect to the server's rendezvous store, or fail after ``timeout_s`` naming the address.

    Measured with torch 2.13: ``init_rpc`` on an address where no server listens keeps
    retrying for far longer than any configured timeout (over 2 minutes with
    ``server.startup_timeout_s=5``), so a client started before — or without — its server hung."""
    import datetime

    import torch.distributed as dist

    try:
        dist.TCPStore(env.master_addr, env.master_port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, TimeoutError, OSError) as err:
        raise ConnectionError(
            f"{what}: the server is not reachable at {env.master_addr}:{env.master_port} "
            f"within server.startup_timeout_s={timeout_s:g}s ({str(err).splitlines()[0]}); is the server running?"
        ) from None


# Keys of torch's dynamic RPC group (torch/distributed/rpc/_utils.py and agent_utils.cpp, torch 2.x).
_GROUP_TOKEN_KEY = "RpcGroupManagementToken"
_MEMBER_LIST_KEY = "names/_ALL_WORKER_INFOS"


def _leave_member_list(name: str, rank: int, *, timeout_s: float) -> None:
    """Take this client off the dynamic group's member list, keeping its RPC agent running.

    A process joining a dynamic group calls every listed member (to exchange device maps), with
    the group's lock held; measured with torch 2.13: a listed member that was SIGKILLed (or shut
    down) makes that call fail, the joiner's error path then waits for the lock it holds
    itself, and the lock is never released, so no process can join again. Clients never call
    each other, so each one unlists itself right after joining: a joiner calls only the server
    (and any client still between its join and this call, which is alive). A restarted client
    can then join under its old name and rank. Done under the group's lock, like torch's own
    joins, so a joiner never calls a client that has left the list.
    """
    store = rpc.api._get_current_rpc_agent().store
    token = f"Token_for_{name}_{uuid.uuid4().hex}_unlist"
    deadline = time.monotonic() + timeout_s
    while (holder := store.compare_set(_GROUP_TOKEN_KEY, "", token).decode()) != token:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: the RPC group's lock stayed held by {holder!r} for {timeout_s:.0f}s")
        # Poll, never store.wait(): this process's store client serves one call at a time, and
        # the joiner holding the lock calls this process's agent, which reads the same store to
        # learn the joiner's address; a wait here would hold that read up (measured: a deadlock
        # until the RPC timeout).
        time.sleep(0.05)
    try:
        members = store.get(_MEMBER_LIST_KEY).decode()
        store.set(_MEMBER_LIST_KEY, members.replace(f"{name}-{rank},", ""))
    finally:
        store.set(_GROUP_TOKEN_KEY, "")
        store.set(token, "Done")


def store_port() -> int:
    """The port of the rendezvous store this process's RPC agent uses (the server's, dynamic)."""
    return int(rpc.api._get_current_rpc_agent().store.underlying_store.port)


def wait_until_answered(*, timeout_s: float, poll_s: float = 0.05) -> bool:
    """Wait (at most ``timeout_s``) until this RPC agent has no request in progress, so a local
    shutdown does not cut off an answer still being sent; True if it got there.

    A dynamic group's server shuts down without the graceful barrier, and the answer to a
    client's last message (``leave``) is completed just before the server learns it is done.
    """
    agent = rpc.api._get_current_rpc_agent()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = agent.get_debug_info()
        if int(info.get("agent.server_active_calls", 0)) == 0 and int(info.get("agent.server_active_async_calls", 0)) == 0:
            time.sleep(poll_s)  # the answer's bytes are written after the count drops
            return True
        time.sleep(poll_s)
    return False


def init_server_group(env: DistEnv, *, index: int, size: int, startup_timeout_s: float, timeout_s: float) -> None:
    """Join the collective group of the server's processes (hierarchical sub-servers only).

    The clients are not members: the group is a gloo process group of ``size`` ranks. Under
    torchrun it meets through torchrun's own store (the agent's TCPStore at
    MASTER_ADDR:MASTER_PORT, under a prefix of its own), which listens on every address of its
    machine: fine within one trust domain. Sub-servers started on their own
    (``--sub-server/--cluster``) meet through a store that sub-server 0 hosts on the cluster
    address alone, and gloo listens on the interface each sub-server reaches it through (or on
    ``GLOO_SOCKET_IFNAME``): nothing of the group listens where only the edge should be reachable.
    """
    import torch.distributed as dist

    if env.agent_store:
        store = dist.TCPStore(env.master_addr, env.master_port, is_master=False, timeout=datetime.timedelta(seconds=startup_timeout_s))
    elif env.master_port:
        store = _cluster_store(env, size=size, timeout_s=startup_timeout_s)
        # read by ProcessGroupGloo when it is made (init_process_group passes gloo no options)
        os.environ["GLOO_SOCKET_IFNAME"] = _gloo_interface(env.master_addr, env.master_port)
    else:
        raise RuntimeError(
            "hierarchical sub-servers need a rendezvous: start each with `flglm train --sub-server I --cluster HOST:PORT` "
            "(socket link) or the whole federation with torchrun"
        )
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore("flglm/sub_servers", store),
        rank=index,
        world_size=size,
        timeout=datetime.timedelta(seconds=timeout_s),  # bounds each collective
    )


def _cluster_store(env: DistEnv, *, size: int, timeout_s: float) -> torch.distributed.TCPStore:
    """Sub-server 0 hosts the group's store on the cluster address alone (a socket it binds
    itself: TCPStore on its own listens on every address); the others connect to it."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if env.rank != 0:
        try:
            return dist.TCPStore(env.master_addr, env.master_port, is_master=False, timeout=timeout)
        except (RuntimeError, TimeoutError, OSError) as err:
            raise ConnectionError(
                f"sub-server {env.rank}: sub-server 0's store is not reachable at {env.master_addr}:{env.master_port} "
                f"within server.startup_timeout_s={timeout_s:g}s ({str(err).splitlines()[0]})"
            ) from None
    family = socket.AF_INET6 if ":" in env.master_addr else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((env.master_addr, env.master_port))
        listener.listen(64)
    except OSError as err:
        listener.close()
        raise RuntimeError(
            f"--cluster {env.master_addr}:{env.master_port}: sub-server 0 cannot listen there ({err.strerror}); "
            "give an address of this machine on the sub-servers' own network and a free port"
        ) from None
    return dist.TCPStore(
        env.master_addr, env.master_port, world_size=size, is_master=True, timeout=timeout,
        wait_for_workers=False, master_listen_fd=listener.detach(),
    )  # fmt: skip


def _gloo_interface(cluster_host: str, cluster_port: int) -> str:
    """The interface gloo listens on: ``GLOO_SOCKET_IFNAME`` if set, else the one this machine
    reaches the cluster store through (the sub-servers' network; ``lo`` for one machine)."""
    import psutil

    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return os.environ["GLOO_SOCKET_IFNAME"]
    family = socket.AF_INET6 if ":" in cluster_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:  # connect() on UDP sends nothing: it picks the route
        probe.connect((cluster_host, cluster_port))
        local = probe.getsockname()[0]
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == local for a in addresses):
            return name
    raise RuntimeError(f"--cluster {cluster_host}: no interface of this machine has {local}, the address that reaches it")
