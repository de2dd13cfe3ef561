"""The one place that reads the distributed environment torchrun sets, and sets threads.

Everything else takes a ``DistEnv`` argument. Measured on a 2-core machine: two processes
that each use every core run 30-60x slower than with one thread each (OpenMP spin-waits on a
busy core), so each process of a federation takes its share of the cores.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.distributed import rpc

log = logging.getLogger("flglm")

_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


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


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read torchrun's variables; raises naming the missing ones when not under torchrun."""
    environ = os.environ if environ is None else environ
    missing = [k for k in _TORCHRUN_KEYS if k not in environ]
    if missing:
        raise RuntimeError(
            f"not started by torchrun (missing {', '.join(missing)}); run e.g. "
            "`torchrun --nproc-per-node=3 launch/train.py --config configs/demo.yaml`"
        )
    return DistEnv(
        rank=int(environ["RANK"]),
        world_size=int(environ["WORLD_SIZE"]),
        local_rank=int(environ["LOCAL_RANK"]),
        local_world_size=int(environ["LOCAL_WORLD_SIZE"]),
        master_addr=environ["MASTER_ADDR"],
        master_port=int(environ["MASTER_PORT"]),
        restart_count=int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
    )


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
def rpc_worker(name: str, env: DistEnv, options: rpc.TensorPipeRpcBackendOptions, *, what: str) -> Iterator[None]:
    """This process is RPC worker ``name`` for the block's duration.

    On success RPC shuts down gracefully (waiting for every worker). On failure the error is
    logged (as ``what`` failed), RPC shuts down at once — a graceful shutdown would wait for the
    other workers, which torchrun stops instead — and the error propagates.
    """
    rpc.init_rpc(name, rank=env.rank, world_size=env.world_size, rpc_backend_options=options)
    try:
        yield
    except BaseException:
        log.exception("%s failed", what)
        rpc.shutdown(graceful=False)
        raise
    rpc.shutdown()


def init_server_group(env: DistEnv, *, index: int, size: int, startup_timeout_s: float, timeout_s: float) -> None:
    """Join the collective group of the server's processes (hierarchical sub-servers only).

    The clients are not members: the group is a gloo process group of ``size`` ranks that meets
    through torchrun's own store (the agent's TCPStore at MASTER_ADDR:MASTER_PORT, under a prefix
    of its own), so it needs no extra port and works across nodes with torchrun's flags.
    """
    import datetime

    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        raise RuntimeError("hierarchical sub-servers need torchrun's store (start the federation with torchrun)")
    store = dist.TCPStore(env.master_addr, env.master_port, is_master=False, timeout=datetime.timedelta(seconds=startup_timeout_s))
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore("flglm/sub_servers", store),
        rank=index,
        world_size=size,
        timeout=datetime.timedelta(seconds=timeout_s),  # bounds each collective
    )
