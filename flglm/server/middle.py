"""The server's compute core: the middle stack, its optimizer and the one thread all model work runs on.

It knows nothing of clients' membership, turns or rounds: a serving mode (``flglm.server.serving``)
decides when to call it. Requests arrive as a :class:`~flglm.link.crossing.Crossing` (hidden
states, mask, positions, prefixes), already checked by the :class:`~flglm.server.intake.Intake`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from flglm.config import RunConfig
from flglm.devices import autocast_for
from flglm.link.crossing import Crossing
from flglm.link.messages import AUTOCAST_DTYPES, InvalidMessageError, RequestHeader, check_gradient, wire
from flglm.models.split import MiddleStack, max_positions_of
from flglm.optim import build_optimizer, grad_norms, scale_grads, set_lr
from flglm.server.decode_sessions import DecodeSessions
from flglm.server.intake import Intake, finite
from flglm.server.pending import Pending, PendingForwards
from flglm.server.stats import ServerStats

log = logging.getLogger("flglm.server")
T = TypeVar("T")

Grads = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""d loss / d inputs, and with P-tuning v2 d loss / d prefixes."""


class MiddleCompute:
    """Runs forwards, backwards, decoding steps and optimizer steps of one middle stack.

    Args:
        on_samples: called with each training forward's batch size (hierarchical serving weighs replicas by it).
        kill_at_step: fault injection (``faults.kill_server_at_step``): SIGKILL this process after that step.
    """

    def __init__(self, cfg: RunConfig, middle: MiddleStack, stats: ServerStats, *, kill_at_step: int = 0) -> None:
        self.cfg = cfg
        self.middle = middle
        self.stats = stats
        self.named_params = [(n, p) for n, p in middle.hf.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.optimizer = build_optimizer(self.params, cfg.optim) if self.params else None
        self.lock = threading.RLock()
        self.intake = Intake(middle, cfg.server, stats, max_positions=max_positions_of(middle.hf.config))
        self.pending = PendingForwards(timeout_s=cfg.server.state_timeout_s, per_client=cfg.server.max_pending_per_client, stats=stats)
        s = cfg.server
        self.decoding = DecodeSessions(middle.hf.config, max_per_client=s.max_decode_sessions_per_client, idle_timeout_s=s.state_timeout_s)
        self.on_samples: Callable[[int], None] = lambda n: None
        self._kill_at_step = kill_at_step
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flglm-compute")

    # ------------------------------------------------------------- the compute thread
    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the one compute thread and wait for it.

        RPC requests arrive on a pool of threads; running all model work on one thread keeps its
        memory reuse warm (glibc hands each thread its own arena, so tensors allocated on one RPC
        thread and freed on another went back to the OS), which measured here made the middle
        stack's forward ~1.5x slower than in a single-threaded process.
        """
        return self._executor.submit(fn, *args).result()

    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the compute thread without waiting for it."""
        self._executor.submit(fn)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------ the model
    def middle_on(self, header: RequestHeader, crossing: Crossing, *, cache: Any = None, prefix_length: int = 0) -> torch.Tensor:
        """The middle stack on ``crossing``; its prefix (P-tuning v2) goes into a fresh cache in front of the tokens."""
        hidden, prefix = crossing.hidden, crossing.prefix
        if prefix is not None:
            cache, prefix_length = self.middle.prefix_cache(prefix, hidden.shape[0]), prefix.shape[-2]
        with autocast_for(self.middle.device, AUTOCAST_DTYPES[header.autocast]):
            positions = crossing.position_ids.expand(hidden.shape[0], -1)
            return self.middle(hidden, crossing.attention_mask, positions, cache, prefix_length)

    def gathered(self, header: RequestHeader, crossing: Crossing, *, row_prefixes: torch.Tensor | None = None) -> torch.Tensor:
        """The middle stack on a gathered batch (client batching); ``row_prefixes`` holds each row's
        prefixes, ``[rows, layers, 2, kv_heads, prefix_length, head_dim]``."""
        with self.lock:
            if row_prefixes is None:
                return self.middle_on(header, crossing)
            cache = self.middle.prefix_cache_rows(row_prefixes)
            return self.middle_on(header, crossing, cache=cache, prefix_length=row_prefixes.shape[-2])

    def forward(self, header: RequestHeader, crossing: Crossing) -> torch.Tensor:
        """Training forward: keeps the autograd state under (client, request) until the backward."""
        hidden, prefix = crossing.hidden, crossing.prefix
        with self.lock:
            self.pending.sweep()
            key = (header.client_id, header.request_id)
            if key in self.pending:
                self.intake.rejected()
                raise InvalidMessageError(f"{header.describe()}: a forward with this id is already pending")
            self.pending.make_room(header.client_id)
            bad_hidden = self.intake.skips(hidden)
            if bad_hidden or self.intake.skips(prefix):
                zeros = self.intake.skip(header, "hidden states" if bad_hidden else "prefixes", hidden.shape, hidden.dtype)
                self.pending.add(key, Pending(torch.zeros_like(hidden), zeros, prefix, skipped=True))
                return wire(zeros)
            self.middle.train()
            inputs = hidden.detach().requires_grad_(hidden.is_floating_point())
            prefix_in = prefix.detach().requires_grad_() if prefix is not None else None
            with torch.enable_grad():
                outputs = self.middle_on(header, Crossing(inputs, crossing.attention_mask, crossing.position_ids, prefix_in))
            self.pending.add(key, Pending(inputs, outputs, prefix_in))
            self.on_samples(hidden.shape[0])
            self.stats.forwards += 1
            return wire(outputs.to(hidden.dtype))

    def infer(self, header: RequestHeader, crossing: Crossing) -> torch.Tensor:
        """Evaluation forward: no_grad, nothing kept."""
        hidden = crossing.hidden
        with self.lock, torch.no_grad():
            if self.intake.skips(hidden) or self.intake.skips(crossing.prefix):
                return wire(self.intake.skip(header, "hidden states or prefixes", hidden.shape, hidden.dtype))
            self.middle.eval()
            outputs = self.middle_on(header, crossing)
            self.stats.inferences += 1
            return wire(outputs.to(hidden.dtype))

    def decode(self, header: RequestHeader, session: int, past: int, crossing: Crossing) -> torch.Tensor:
        """One generation step of a decoding session: the new tokens, attending to the ``past`` ones its cache holds."""
        hidden, prefix = crossing.hidden, crossing.prefix
        with self.lock, torch.no_grad():
            try:
                if self.intake.skips(hidden) or self.intake.skips(prefix):
                    # skipping would leave the session's cache a token short: refuse instead
                    raise InvalidMessageError(f"{header.describe()}: hidden states or prefixes of a decoding step contain NaN or Inf")
                entry = self.decoding.session_for(header.client_id, session, past=past, batch=hidden.shape[0])
                if prefix is not None and past != 0:
                    raise InvalidMessageError(f"{header.describe()}: prefixes come with a session's first step only")
            except InvalidMessageError:
                self.intake.rejected()
                raise
            self.middle.eval()
            try:
                if prefix is not None:
                    entry.cache = self.middle.prefix_cache(prefix, hidden.shape[0])
                    entry.prefix_length = prefix.shape[-2]
                tokens = Crossing(hidden, crossing.attention_mask, crossing.position_ids)
                outputs = self.middle_on(header, tokens, cache=entry.cache, prefix_length=entry.prefix_length)
            except BaseException:
                self.decoding.end(header.client_id, session)  # a half-updated cache is useless
                raise
            entry.length += hidden.shape[1]
            self.stats.decodes += 1
            return wire(outputs.to(hidden.dtype))

    def backward(self, header: RequestHeader, grad: torch.Tensor) -> Grads:
        """Backpropagate ``grad`` (d loss / d outputs) through a pending forward."""
        with self.lock:
            key = (header.client_id, header.request_id)
            pending = self.pending.get(key)
            if pending is None:
                self.intake.rejected()
                raise InvalidMessageError(f"{header.describe()}: no pending forward (never sent, already backpropagated, or timed out)")
            skip = self.intake.skips(grad)
            try:
                check_gradient(header, finite(grad) if skip else grad, pending.outputs)
            except InvalidMessageError:
                self.intake.rejected()
                raise
            self.pending.pop(key)
            if pending.skipped or skip:
                # a skipped forward has no graph; a non-finite gradient is not applied
                zeros = self.intake.skip(header, "gradient", pending.inputs.shape, pending.inputs.dtype) if skip else torch.zeros_like(pending.inputs)
                return wire(zeros) if pending.prefix is None else (wire(zeros), wire(torch.zeros_like(pending.prefix)))
            pending.outputs.backward(grad.to(pending.outputs.dtype))
            self.stats.backwards += 1
            grad_in = wire(pending.inputs.grad if pending.inputs.grad is not None else torch.zeros_like(pending.inputs))
            if pending.prefix is None:
                return grad_in
            prefix = pending.prefix
            return grad_in, wire(prefix.grad if prefix.grad is not None else torch.zeros_like(prefix))

    # -------------------------------------------------------------- the optimizer
    def grad_norms(self) -> torch.Tensor:
        """Per-parameter gradient norms in ``named_params`` order (-1: no gradient)."""
        with self.lock:
            norms = grad_norms(self.named_params)
            return torch.stack([norms.get(n, torch.tensor(-1.0)) for n, _ in self.named_params]) if self.named_params else torch.zeros(0)

    def step(self, client_step: int, total_steps: int, grad_scale: float, clip_value: float | None) -> None:
        """One optimizer step; the LR schedule is evaluated at the client's own step index."""
        with self.lock:
            if self.optimizer is not None:
                scale_grads(self.params, float(grad_scale))
                if clip_value is not None:
                    torch.nn.utils.clip_grad_value_(self.params, clip_value)
                set_lr(self.optimizer, self.cfg.optim, int(client_step), int(total_steps))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.stats.steps += 1
            if self.stats.steps == self._kill_at_step:
                log.warning("fault injection: killing the server (SIGKILL) after step %d", self.stats.steps)
                os.kill(os.getpid(), signal.SIGKILL)

    def discard_grads(self) -> None:
        """Drop a half-done step's gradients (its client left, timed out, or its group failed)."""
        with self.lock:
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)

    def forget(self, client_id: int | None) -> int:
        """Free a client's pending forwards and decoding caches; how many forwards there were."""
        with self.lock:
            freed = self.pending.drop_client(client_id)
            if client_id is not None:
                self.decoding.drop_client(client_id)
            return freed
