"""``server.parallelism=auto``: pick how the server serves many clients, from what it has.

Several server processes (``server.sub_servers > 1``) → ``hierarchical``: each serves its own
clients with its own replica. One server process → ``client_batching`` if the middle stack's
training activations for a full gathered batch (``max_clients_per_batch`` clients' micro-batches)
fit in the memory still free on the server's device once its weights are loaded (a GPU's:
``torch.cuda.mem_get_info``; the CPU's: the OS's estimate), with the gradients and optimizer
state of what trains; otherwise ``sequential``, whose batches are one client's. The choice and
its numbers are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flglm.config import RunConfig, ServerConfig
from flglm.server.middle import MiddleCompute
from flglm.server.serving import Serving
from flglm.server.serving.batching import ClientBatcher
from flglm.server.serving.sequential import SequentialServing

log = logging.getLogger("flglm.server")

MEMORY_HEADROOM = 0.8
"""Plan to use at most this fraction of the free memory."""


@dataclass(frozen=True)
class ParallelismChoice:
    mode: str
    reason: str


def training_bytes(*, trainable: int, layers: int, hidden: int, intermediate: int, heads: int, tokens: int, seq_len: int) -> int:
    """Rough upper bound of the memory one training step on ``tokens`` tokens adds to a loaded
    middle stack: float32 gradients and two AdamW moments of the ``trainable`` parameters, and per
    block the activations autograd keeps (projections, MLP, norms: ~10·hidden + 3·intermediate
    float32 values per token; attention scores: heads · seq_len per token)."""
    state = 12 * trainable
    per_token_per_layer = 4 * (10 * hidden + 3 * intermediate + heads * seq_len)
    return state + layers * tokens * per_token_per_layer


def choose_parallelism(
    cfg: RunConfig, middle_config: Any, *, trainable: int, layers: int, free_bytes: int, where: str = "the host"
) -> ParallelismChoice:
    """Resolve ``cfg.server.parallelism`` (``auto`` or an explicit mode) to the mode to run;
    ``free_bytes`` is what is free on ``where`` (the server's device) with the weights loaded."""
    s = cfg.server
    if s.parallelism != "auto":
        return ParallelismChoice(s.parallelism, "set in the config (server.parallelism)")
    if s.sub_servers > 1:
        return ParallelismChoice("hierarchical", f"server.sub_servers={s.sub_servers} server processes, one replica each")
    if s.nonfinite == "skip":
        return ParallelismChoice("sequential", "one server process; server.nonfinite=skip skips one client's step, not a gathered batch's")
    hidden = int(getattr(middle_config, "hidden_size", getattr(middle_config, "n_embd", 0)))
    intermediate = int(getattr(middle_config, "intermediate_size", None) or getattr(middle_config, "n_inner", None) or 4 * hidden)
    heads = int(getattr(middle_config, "num_attention_heads", getattr(middle_config, "n_head", 1)))
    seq = cfg.data.max_length
    tokens = s.max_clients_per_batch * cfg.data.batch_size * seq
    needed = training_bytes(trainable=trainable, layers=layers, hidden=hidden, intermediate=intermediate, heads=heads, tokens=tokens, seq_len=seq)
    budget = int(free_bytes * MEMORY_HEADROOM)
    numbers = (
        f"a gathered batch of {s.max_clients_per_batch} clients x {cfg.data.batch_size} x {seq} tokens needs "
        f"~{needed / 2**20:.0f} MiB, {MEMORY_HEADROOM:.0%} of the memory free on {where} is {budget / 2**20:.0f} MiB"
    )
    if needed <= budget:
        return ParallelismChoice("client_batching", f"one server process; {numbers}")
    return ParallelismChoice("sequential", f"one server process and {numbers}: serving one client at a time")


def free_memory_bytes(device: torch.device | None = None) -> int:
    """Memory free now where the middle stack computes: on a GPU what the driver reports free on
    it (``torch.cuda.mem_get_info``), on the CPU the OS's estimate of available memory."""
    if device is not None and device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def make_serving(mode: str, compute: MiddleCompute, *, clients: Sequence[int], settings: ServerConfig) -> Serving:
    """The serving of a resolved mode: client batching gathers requests; ``sequential`` and each
    ``hierarchical`` sub-server give one client's step the middle stack at a time."""
    if mode == "client_batching":
        window_s = settings.batch_window_ms / 1000
        return ClientBatcher(
            compute, clients=clients, max_clients=settings.max_clients_per_batch, window_s=window_s, timeout_s=settings.request_timeout_s
        )
    if mode in ("sequential", "hierarchical"):
        return SequentialServing(compute, turn_timeout_s=settings.state_timeout_s)
    raise ValueError(f"no serving for parallelism {mode!r} (resolve 'auto' with choose_parallelism first)")
