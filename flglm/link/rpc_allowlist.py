"""Defence in depth for the torch RPC link: what a peer's RPC message may name when it is unpickled.

torch RPC unpickles every Python call and answer it receives
(``torch.distributed.rpc.internal.deserialize``) with a plain :class:`pickle.Unpickler`: the
function to run and every object in its arguments are looked up by names the sender chose, so
a peer can run ``eval``, or any callable reachable from an import, in this process.
:func:`install` replaces that unpickler, for this process, with :class:`AllowlistUnpickler`,
which resolves only:

* the endpoint's entry points (:mod:`flglm.link.rpc_entries`), and RRef method calls on the
  endpoint, which are allowed only for the names in ``ENTRY_NAMES``;
* the calls torch RPC makes itself: an RRef's type query, graceful shutdown's gather and
  broadcast, a dynamic group's device query and membership update;
* the RPC pickler's tensor and RRef receivers, and the few value types those calls carry
  (``WorkerInfo``, ``torch.device``);
* for answers, exception classes (the caller builds one from a message) and the endpoint's type.

Anything else fails with :class:`RefusedName` before any object is built. There is
no ``getattr`` (a pickle that may call ``getattr`` reaches everything): the receivers the RPC
pickler pickles as ``getattr(class, name)`` go through an exact table of such pairs.

Not covered, measured (SECURITY.md): builtin torch operators (``torch.from_file`` ...) and
TorchScript functions travel as ``ScriptCall`` messages that the C++ agent runs without
calling Python; the rendezvous store and the TensorPipe port take anyone's connection. The
torch RPC link is for one trust domain; across organisations use ``link.transport=socket``.
"""

from __future__ import annotations

import importlib
import pickle
import sys
from typing import Any

import torch
from torch.distributed import rpc
from torch.distributed.rpc import _utils as rpc_utils
from torch.distributed.rpc import api as rpc_api
from torch.distributed.rpc import backend_registry, rref_proxy
from torch.distributed.rpc import internal as rpc_internal

from flglm.link import rpc_entries


class RefusedName(AttributeError, pickle.UnpicklingError):
    """A payload named something the allowlist does not hold.

    An ``AttributeError`` because that is the one unpickling failure torch RPC turns into an
    answer (the caller gets it back as the call's exception, an ``rpc.remote`` object holds it as
    its error); any other exception escapes into the agent and leaves the call unanswered, and
    an unanswered ``rpc.remote`` keeps graceful shutdown waiting (measured with torch 2.13)."""


def _check_entry(func_name: str) -> None:
    if func_name not in rpc_entries.ENTRY_NAMES:
        raise PermissionError(f"RPC: only the endpoint's {', '.join(rpc_entries.ENTRY_NAMES)} may be called, not {func_name!r}")


def _local_invoke(rref: Any, func_name: str, args: tuple, kwargs: dict) -> Any:
    """torch's RRef method call, for the endpoint's entry points only."""
    _check_entry(func_name)
    return rref_proxy._local_invoke(rref, func_name, args, kwargs)


@rpc.functions.async_execution
def _local_invoke_async_execution(rref: Any, func_name: str, args: tuple, kwargs: dict) -> Any:
    """torch's RRef method call of an ``async_execution`` method, for the endpoint's entry points only."""
    _check_entry(func_name)
    return rref_proxy._local_invoke_async_execution(rref, func_name, args, kwargs)


_PICKLER = rpc_internal._InternalRPCPickler
_ATTRIBUTES: dict[tuple[object, str], object] = {
    (_PICKLER, "_tensor_receiver"): _PICKLER._tensor_receiver,
    (_PICKLER, "_py_rref_receiver"): _PICKLER._py_rref_receiver,
}
"""``getattr(owner, name)`` pairs the RPC pickler writes for its receivers (bound classmethods)."""


def _allowed_getattr(owner: object, name: str) -> object:
    found = _ATTRIBUTES.get((owner, name))
    if found is None:
        raise RefusedName(f"RPC payload asks for getattr({owner!r}, {name!r}), which is not allowed")
    return found


def _globals() -> dict[tuple[str, str], object]:
    named: list[object] = [
        _PICKLER,  # only as getattr's owner below
        rpc_internal.PythonUDF,
        rpc_internal.RemoteException,
        rpc_api._rref_typeof_on_owner,
        rpc_api._gather_to_leader,
        rpc_api._broadcast_to_followers,
        rpc_utils._update_group_membership,
        backend_registry._get_device_infos,
        torch._C._distributed_rpc.WorkerInfo,
        torch.device,
        *rpc_entries.ENTRIES.values(),
        rpc_entries.instance,
    ]
    table: dict[tuple[str, str], object] = {(obj.__module__, obj.__qualname__): obj for obj in named}  # type: ignore[attr-defined]
    table[("builtins", "getattr")] = _allowed_getattr
    table[("torch.distributed.rpc.rref_proxy", "_local_invoke")] = _local_invoke
    table[("torch.distributed.rpc.rref_proxy", "_local_invoke_async_execution")] = _local_invoke_async_execution
    return table


_GLOBALS = _globals()


def _resolve(module: str, qualname: str) -> object | None:
    """``module.qualname`` without running anything new (``flglm`` modules may be imported, others
    only if already loaded, no dunder attributes), or None."""
    if module.startswith("flglm.") and not module.endswith("__main__"):
        target: object = importlib.import_module(module)
    elif module in sys.modules:
        target = sys.modules[module]
    else:
        return None
    for part in qualname.split("."):
        if part.startswith("__"):
            return None
        target = getattr(target, part, None)
    return target


class AllowlistUnpickler(pickle.Unpickler):
    """Unpickles an RPC payload, resolving only the names this module allows."""

    def find_class(self, module: str, name: str) -> Any:
        found = _GLOBALS.get((module, name))
        if found is not None:
            return found
        try:
            obj = _resolve(module, name)
        except ImportError:
            obj = None
        if isinstance(obj, type) and (issubclass(obj, BaseException) or _is_endpoint_type(obj)):
            return obj  # answers: exceptions the caller rebuilds; the endpoint's type for an RRef call
        raise RefusedName(f"RPC payload names {module}.{name}, which is not allowed")


def _is_endpoint_type(cls: type) -> bool:
    """The server endpoint's class, which an RRef call's type query answers with; only a process
    that serves no endpoint (a client) needs it."""
    if rpc_entries.serving():
        return False
    return all(callable(getattr(cls, n, None)) for n in rpc_entries.ENTRY_NAMES)


def install() -> None:
    """Make every RPC payload this process receives go through :class:`AllowlistUnpickler` (idempotent)."""
    rpc_internal._unpickler = AllowlistUnpickler
