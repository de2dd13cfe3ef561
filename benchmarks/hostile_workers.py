"""Processes of ``benchmarks/hostile.py`` for the torch RPC mode (``link.transport=rpc``).

    torchrun ... benchmarks/hostile_workers.py --config ...   # a federation process (launch/train.py);
                                                              # the rank named by HOSTILE_RANK also attacks
    python benchmarks/hostile_workers.py stranger SPEC.json   # a keyless process joining the RPC group

The hostile participant is a real client of a real federation: it runs ``flglm train`` as
every client does (and trains honestly), and from a side thread, once its RPC agent is up,
makes its own RPC calls to the server and to the peer client with the RPC agent torchrun's
world gives it. Each attempt's outcome goes to ``SPEC["out"]`` (JSON) as soon as it is known:
what came back (bytes as hex, so the benchmark can compare them with the real files), or the
error. The benchmark decides what counts as succeeded.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed import rpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flglm.jobs.hostile import Exploit, store_access

CALL_TIMEOUT_S = 10.0


def _describe(value: Any) -> dict[str, Any]:
    if isinstance(value, torch.Tensor):
        value = bytes(value.contiguous().view(torch.uint8).numpy())
    if isinstance(value, bytes | bytearray):
        return {"returned": "bytes", "hex": bytes(value).hex()}
    return {"returned": type(value).__name__, "repr": repr(value)[:300]}


class Recorder:
    """Each attempt's outcome, rewritten to ``path`` after every attempt (a crash loses nothing done)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.results: dict[str, dict[str, Any]] = {}

    def attempt(self, name: str, action: Callable[[], Any]) -> None:
        start = time.monotonic()
        try:
            outcome = _describe(action())
        except Exception as exc:  # noqa: BLE001 - a refusal is what we measure
            outcome = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}
        outcome["seconds"] = round(time.monotonic() - start, 3)
        self.results[name] = outcome
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(self.path)


def rpc_attacks(rec: Recorder, spec: dict[str, Any], *, via: str) -> None:
    """Every RPC attack of the set, from a process whose RPC agent is up (``via`` prefixes the names)."""
    key, train, key_dir = spec["server_key"], spec["peer_train"], spec["server_key_dir"]
    for target, path in (("server", key), ("client0", train)):
        read = f"open({path!r}, 'rb').read(64)"
        rec.attempt(f"{via}eval:{target}", lambda t=target, r=read: rpc.rpc_sync(t, eval, args=(r,), timeout=CALL_TIMEOUT_S))
        marker = spec["markers"][target]
        rec.attempt(f"{via}pickle:{target}", lambda t=target, m=marker: rpc.rpc_sync(t, str, args=(Exploit(m),), timeout=CALL_TIMEOUT_S))
        rec.attempt(
            f"{via}from_file:{target}",
            lambda t=target, p=path: rpc.rpc_sync(t, torch.from_file, args=(p, False, 32), kwargs={"dtype": torch.uint8}, timeout=CALL_TIMEOUT_S),
        )
        rec.attempt(
            f"{via}remote:{target}",
            lambda t=target: rpc.remote(t, eval, args=("__import__('os').getpid()",), timeout=CALL_TIMEOUT_S).to_here(timeout=CALL_TIMEOUT_S),
        )
    rec.attempt(f"{via}nonpublic:server", lambda: rpc.rpc_sync("server", os.listdir, args=(key_dir,), timeout=CALL_TIMEOUT_S))


def _participant(spec: dict[str, Any]) -> None:
    rec = Recorder(Path(spec["out"]))
    deadline = time.monotonic() + 120
    while not rpc._is_current_rpc_agent_set():  # the federation's own init_rpc, in the main thread
        if time.monotonic() > deadline:
            rec.attempt("agent", lambda: (_ for _ in ()).throw(TimeoutError("no RPC agent within 120 s")))
            return
        time.sleep(0.05)
    log = Path(spec["server_log"])
    while not (log.is_file() and "joined (2/2)" in log.read_text(errors="replace")) and time.monotonic() < deadline:
        time.sleep(0.05)  # both clients joined: the honest run is under way
    rpc_attacks(rec, spec, via="")
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    rec.attempt("rendezvous", lambda: store_access(host, port))


def _stranger(spec_path: str) -> int:
    """A process with no key and no place in torchrun's world: join the RPC group through the
    store on ``SPEC["store"]`` (as ``federation.membership=dynamic`` clients do), then attack."""
    spec = json.loads(Path(spec_path).read_text())
    rec = Recorder(Path(spec["out"]))
    host, port = spec["store"]
    options = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://{host}:{port}", rpc_timeout=CALL_TIMEOUT_S, _transports=["uv"], _channels=["basic"])
    rec.attempt("join", lambda: rpc.init_rpc("stranger", rank=97, world_size=None, rpc_backend_options=options) or "joined")
    if "error" in rec.results["join"]:
        return 0
    rpc_attacks(rec, spec, via="")
    rpc.shutdown(graceful=False)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "stranger":
        sys.exit(_stranger(sys.argv[2]))
    if os.environ.get("RANK") == os.environ.get("HOSTILE_RANK"):
        spec = json.loads(Path(os.environ["HOSTILE_SPEC"]).read_text())
        threading.Thread(target=_participant, args=(spec,), name="hostile-participant", daemon=True).start()
    from flglm.cli import train_main

    sys.exit(train_main())
