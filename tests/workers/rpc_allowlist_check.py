"""Worker of tests/test_rpc_allowlist.py: a peer's own RPC calls against the allowlist, over real RPC.

    torchrun --standalone --nproc-per-node=2 tests/workers/rpc_allowlist_check.py MARKER SECRET

Both ranks join through ``flglm.distributed.rpc_worker`` (which installs the allowlist, as every
flglm process of the rpc mode does). Rank 0 serves a stub endpoint; rank 1 makes the calls a
hostile participant would and prints one JSON line: per attack, what came back or the error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed import rpc
from torch.futures import Future

from flglm.distributed import configure_threads, read_env, rpc_options, rpc_worker
from flglm.link import rpc_entries


class StubEndpoint:
    """The three entry points, answering something recognisable; and a method nobody may call."""

    def handshake(self, client_id: int, hello: torch.Tensor) -> torch.Tensor:
        return hello + client_id

    @rpc.functions.async_execution
    def exchange(self, client_id: int, kind: str, round_index: int, step: int, tensors: list[torch.Tensor]) -> Future:
        future: Future = Future()
        future.set_result([t * 2 for t in tensors])
        return future

    @rpc.functions.async_execution
    def sealed(self, client_id: int, kind: str, message: torch.Tensor) -> Future:
        future: Future = Future()
        future.set_result(message)
        return future

    def private_state(self) -> str:
        return "private state"


class RunsCommand:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _attempt(action: Any) -> dict[str, Any]:
    try:
        value = action()
    except Exception as exc:  # noqa: BLE001 - what the attacker got back is the result
        return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:600]}
    if isinstance(value, torch.Tensor):
        return {"returned": value.flatten()[:64].to(torch.uint8).tolist() if value.dtype == torch.uint8 else value.tolist()}
    if isinstance(value, BaseException):
        return {"error": f"{type(value).__name__}: {value}"[:300]}
    return {"returned": repr(value)[:300]}


def attacks(marker: str, secret: str) -> dict[str, dict[str, Any]]:
    rref = rpc.remote("server", rpc_entries.instance)
    return {
        "entry_handshake": _attempt(lambda: rpc.rpc_sync("server", rpc_entries.handshake, args=(3, torch.ones(2)))),
        "entry_exchange_by_rref": _attempt(lambda: rref.rpc_sync().exchange(1, "forward", 0, 0, [torch.ones(2)])),
        "eval": _attempt(lambda: rpc.rpc_sync("server", eval, args=("__import__('os').getpid()",))),
        "pickle_command": _attempt(lambda: rpc.rpc_sync("server", rpc_entries.handshake, args=(RunsCommand(marker),))),
        "remote_eval": _attempt(lambda: rpc.remote("server", eval, args=("1 + 1",)).to_here()),
        "listdir": _attempt(lambda: rpc.rpc_sync("server", os.listdir, args=("/",))),
        "rref_private_method": _attempt(lambda: rref.rpc_sync().private_state()),
        "from_file": _attempt(lambda: rpc.rpc_sync("server", torch.from_file, args=(secret, False, 16), kwargs={"dtype": torch.uint8})),
    }


def main() -> int:
    marker, secret = sys.argv[1], sys.argv[2]
    env = read_env()
    configure_threads(env.local_world_size)
    options = rpc_options(num_worker_threads=4, timeout_s=30)
    if env.rank == 0:
        rpc_entries.install(StubEndpoint())
        with rpc_worker("server", env, options, what="the stub server"):
            pass  # graceful shutdown waits for the client's calls
        return 0
    with rpc_worker("client1", env, options, what="the hostile participant"):
        results = attacks(marker, secret)
    print(json.dumps(results | {"marker_exists": Path(marker).exists()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
