"""Link settings both sides derive from the config alike (server and client jobs import them)."""

from __future__ import annotations

from torch.distributed import rpc

from flglm.config import RunConfig
from flglm.distributed import rpc_options


def rpc_backend_options(cfg: RunConfig) -> rpc.TensorPipeRpcBackendOptions:
    """TensorPipe options of a federation process (enough worker threads for every client)."""
    return rpc_options(
        num_worker_threads=max(cfg.server.num_rpc_threads, 2 * cfg.federation.num_clients + 4),
        timeout_s=cfg.server.rpc_timeout_s,
    )


def max_message_bytes(cfg: RunConfig) -> int:
    """The largest sealed message either side accepts (``crypto.max_message_mb``)."""
    return int(cfg.crypto.max_message_mb * 2**20)
