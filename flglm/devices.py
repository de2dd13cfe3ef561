"""Where each side computes: ``server.device`` / ``client.device`` resolved to a ``torch.device``,
the Lightning accelerator that goes with it, a device-aware autocast, and each process's peak memory.

``cuda`` without an index means this process's local GPU, ``cuda:{local_rank % gpus}``, so
hierarchical sub-server ``i`` (local rank ``i``) and the clients on a node each take their own
GPU. The local rank comes from :class:`flglm.distributed.DistEnv` (the only reader of the env).
"""

from __future__ import annotations

import logging
import resource
import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from flglm.config import ConfigError

log = logging.getLogger("flglm")


def resolve_device(setting: str, *, key: str, local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` as a device of this machine; ``key`` names the setting in errors."""
    if setting == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if setting == "auto":
        if not available:
            log.info("%s=auto: using the CPU (torch.cuda.is_available() is False)", key)
            return torch.device("cpu")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        log.info("%s=auto: using %s (local rank %d of %d GPU(s))", key, device, local_rank, torch.cuda.device_count())
        return device
    if setting != "cuda" and not setting.startswith("cuda:"):
        raise ConfigError(f"{key}={setting!r} is not one of auto, cpu, cuda, cuda:N")
    if not available:
        raise ConfigError(f"{key}={setting}: CUDA is not available on this machine (torch.cuda.is_available() is False)")
    count = torch.cuda.device_count()
    index = local_rank % count if setting == "cuda" else int(setting.removeprefix("cuda:"))
    if index >= count:
        raise ConfigError(f"{key}={setting}: this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def to_link(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU, where the link carries it (and seals it).

    From a GPU it is copied into pinned host memory: the copy runs at full PCIe speed without the
    staging a pageable copy needs, and torch's host allocator caches the buffer, so a large
    crossing does not pay the OS's page faults every step. Differentiable, like ``.to("cpu")``.
    """
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host


def to_compute(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on the device that computes on it; from pinned memory (what an encrypted link
    opens into on a GPU side) the copy is asynchronous and overlaps the host's next work."""
    return tensor.to(device, non_blocking=True)


def lightning_accelerator(device: torch.device) -> dict[str, Any]:
    """The ``accelerator``/``devices`` arguments of a single-process ``L.Trainer`` on ``device``."""
    if device.type == "cuda":
        return {"accelerator": "cuda", "devices": [device.index or 0]}
    return {"accelerator": "cpu", "devices": 1}


def autocast_for(device: torch.device | str, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """``torch.autocast`` on ``device``'s type (no-op for ``dtype=None``): the server computes as its client does."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def active_autocast() -> str:
    """The dtype name autocast runs under in this thread (CUDA's first, then the CPU's), "" if none."""
    for device_type in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device_type):
            return str(torch.get_autocast_dtype(device_type)).removeprefix("torch.")
    return ""


def peak_memory(device: torch.device | None = None) -> dict[str, float]:
    """This process's peak resident host memory and, on CUDA, peak allocated device memory, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_host_mb": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    if device is not None and device.type == "cuda":
        out["peak_device_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def memory_summary(server: dict[str, float], clients: dict[str, dict[str, float]]) -> dict[str, Any]:
    """``summary.json``'s ``memory``: the server process's peaks and those each client reported (MiB)."""
    keys = ("peak_host_mb", "peak_device_mb")
    return {"server": server, "clients": {c: {k: m[k] for k in keys if k in m} for c, m in clients.items()}}
