"""Tests for flglm.link.rpc_allowlist: what an RPC payload may name when this process unpickles it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from torch.distributed.rpc import internal as rpc_internal

from flglm.jobs.subprocesses import run_torchrun
from flglm.link import rpc_allowlist, rpc_entries
from flglm.link.messages import InvalidMessageError

WORKER = Path(__file__).parent / "workers" / "rpc_allowlist_check.py"


class _RunsCommand:
    """Unpickling it would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


class _GetsMethod:
    """Unpickling it would fetch a method of the RPC pickler that is not one of its receivers."""

    def __reduce__(self) -> tuple:
        return (getattr, (rpc_internal._InternalRPCPickler, "deserialize"))


def _rpc_payload(obj: object) -> tuple[bytes, list[torch.Tensor]]:
    return rpc_internal._internal_rpc_pickler.serialize(obj)


def _deserialize(obj: object) -> object:
    """``obj`` through torch's RPC serialization and, on the receiving side, the allowlist."""
    data, tensors = _rpc_payload(obj)
    previous = rpc_internal._unpickler
    rpc_allowlist.install()
    try:
        return rpc_internal.deserialize(data, tensors)
    finally:
        rpc_internal._unpickler = previous


def _refusal(obj: object) -> str:
    """The allowlist's refusal of ``obj``, as torch RPC hands it on: an AttributeError it answers with."""
    got = _deserialize(obj)
    assert isinstance(got, AttributeError) and isinstance(got.__cause__, rpc_allowlist.RefusedName), repr(got)
    return str(got.__cause__)


@pytest.mark.parametrize(
    ("func", "args", "named"),
    [
        (eval, ("1 + 1",), "builtins.eval"),
        (os.listdir, ("/",), "posix.listdir"),
        (open, ("/etc/hostname",), "io.open"),
        (torch.load, ("/x",), "torch.serialization.load"),
        (rpc_internal._run_function, (None,), "torch.distributed.rpc.internal._run_function"),
    ],
    ids=["eval", "listdir", "open", "torch.load", "torch-internal"],
)
def test_a_python_call_of_anything_but_the_entry_points_is_refused(func: object, args: tuple, named: str) -> None:
    udf = rpc_internal.PythonUDF(func, args, {})

    assert f"names {named}, which is not allowed" in _refusal(udf)


def test_a_pickle_that_runs_a_command_is_refused_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"

    assert "posix.system" in _refusal(rpc_internal.PythonUDF(rpc_entries.handshake, (_RunsCommand(marker),), {}))

    assert not marker.exists()


def test_getattr_reaches_only_the_rpc_picklers_receivers() -> None:
    refusal = _refusal(rpc_internal.PythonUDF(rpc_entries.handshake, (_GetsMethod(),), {}))

    assert re.search(r"getattr\(<class '\S+_InternalRPCPickler'>, 'deserialize'\), which is not allowed", refusal), refusal


def test_an_entry_point_call_with_tensors_comes_through_unchanged() -> None:
    tensors = [torch.arange(6.0).view(2, 3), torch.tensor([1], dtype=torch.int64)]
    udf = rpc_internal.PythonUDF(rpc_entries.exchange, (3, "forward", 0, 7, tensors), {})

    got = _deserialize(udf)

    assert isinstance(got, rpc_internal.PythonUDF) and got.func is rpc_entries.exchange
    assert got.args[:4] == (3, "forward", 0, 7)
    assert all(torch.equal(a, b) for a, b in zip(got.args[4], tensors))


def test_an_answered_exception_comes_back_but_no_other_class() -> None:
    answer = _deserialize(InvalidMessageError("client 1: bad frame"))
    remote = _deserialize(rpc_internal.RemoteException("On worker: boom", ValueError))

    assert isinstance(answer, InvalidMessageError) and str(answer) == "client 1: bad frame"
    assert remote.exception_type is ValueError
    assert "posix.system" in _refusal(rpc_internal.RemoteException("touch /tmp/x", os.system))


@pytest.mark.parametrize("method", ["__init__", "server", "_forward", "record"])
def test_an_rref_call_reaches_only_the_entry_points(method: str) -> None:
    udf = _deserialize(rpc_internal.PythonUDF(_torch_local_invoke(), (None, method, (), {}), {}))

    with pytest.raises(PermissionError, match=f"only the endpoint's handshake, exchange, sealed may be called, not {method!r}"):
        udf.func(*udf.args)


def _torch_local_invoke() -> object:
    from torch.distributed.rpc import rref_proxy

    return rref_proxy._local_invoke


@pytest.mark.multiprocess
def test_over_real_rpc_a_peer_reaches_the_entry_points_and_torch_operators_only(tmp_path: Path) -> None:
    # Prepare: a secret file on the "server" and the marker a pickle's command would create
    marker, secret = tmp_path / "pwned", tmp_path / "server.key"
    secret.write_bytes(bytes(range(100, 132)))

    # Execute: two processes joined by flglm.distributed.rpc_worker (which installs the allowlist)
    run = run_torchrun(WORKER, [str(marker), str(secret)], nproc=2, timeout_s=120)
    got = json.loads([line for line in run.output.splitlines() if line.startswith("{")][-1])

    # Assert: the entry points answer; every Python call of the peer's choosing is refused, nothing ran
    assert got["entry_handshake"] == {"returned": [4.0, 4.0]}
    assert got["entry_exchange_by_rref"] == {"returned": "[tensor([2., 2.])]"}
    for attack, name in {
        "eval": "builtins.eval",
        "pickle_command": "posix.system",
        "remote_eval": "builtins.eval",
        "listdir": "posix.listdir",
    }.items():
        assert f"names {name}, which is not allowed" in got[attack]["error"] and "returned" not in got[attack], (attack, got[attack])
    assert "PermissionError" in got["rref_private_method"]["error"] and "'private_state'" in got["rref_private_method"]["error"]
    assert got["marker_exists"] is False and not marker.exists()
    # The documented limit (SECURITY.md): a builtin torch operator runs in C++, past any unpickler
    assert got["from_file"] == {"returned": list(range(100, 116))}
