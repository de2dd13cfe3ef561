"""The server: holds the middle stack, its optimizer, and per-request autograd state.

Typed methods: ``hello``, ``forward``, ``infer``, ``decode``/``end_decoding``, ``backward``, ``grad_norms``, ``step``,
``aggregation_begin``/``aggregation_upload``, ``leave``. Clients reach them only through
``flglm.server.endpoint.ServerEndpoint``, which decodes (and, with encryption, opens)
each message. Sequential serving: a client's training step (its forwards, backwards and
optimizer step) has the middle stack to itself; other clients wait for their turn. Evaluation
(``infer``) runs under no_grad, keeps nothing and needs no turn.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch.futures import Future

from flglm.aggregation.fedavg import AggregationRounds
from flglm.aggregation.secure_rounds import SecureRounds
from flglm.config import RunConfig, fingerprint
from flglm.devices import autocast_for
from flglm.link.messages import (
    AUTOCAST_DTYPES,
    InvalidMessageError,
    RequestHeader,
    check_forward,
    check_gradient,
    check_header,
    check_prefix,
    nbytes,
    wire,
)
from flglm.link.protocol import plain_result_tensors, plan_tensor, result_tensors
from flglm.models.prefix import kv_shape
from flglm.models.split import MiddleStack, max_positions_of, plan_for
from flglm.optim import build_optimizer, grad_norms, scale_grads, set_lr
from flglm.resume import (
    CheckpointError,
    checkpoint_path,
    consistent_round,
    load_checkpoint,
    model_fingerprint,
    prune,
    rounds_in,
    save_atomically,
)
from flglm.run_layout import checkpoint_dir
from flglm.server.decode_sessions import DecodeSessions
from flglm.server.serving.batching import ClientBatcher, batching_stats
from flglm.server.serving.hierarchy import SubServerSync

log = logging.getLogger("flglm.server")
T = TypeVar("T")


@dataclass
class _Pending:
    """Autograd state of one forward, kept until its backward (or a timeout)."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    created: float
    prefix: torch.Tensor | None = None
    """P-tuning v2: the prefixes the client sent (their gradient goes back with the inputs')."""
    skipped: bool = False
    """``server.nonfinite=skip``: the forward carried NaN/Inf and never touched the model; its
    backward is answered with zeros."""


@dataclass
class ServerStats:
    forwards: int = 0
    inferences: int = 0
    decodes: int = 0
    backwards: int = 0
    steps: int = 0
    rejected: int = 0
    evicted: int = 0
    dropped_clients: int = 0
    """Clients dropped after ``server.client_timeout_s`` of silence."""
    freed_pending: int = 0
    """Pending forwards (autograd state awaiting a backward) freed because their client was
    dropped, left, or joined again as a new process."""
    skipped_nonfinite: int = 0
    """Forwards and backwards carrying NaN/Inf that were skipped (``server.nonfinite=skip``)."""
    bytes_in: int = 0
    bytes_out: int = 0
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, float]:
        out = {k: v for k, v in self.__dict__.items() if k != "started"}
        out["elapsed_s"] = round(time.monotonic() - self.started, 3)
        return out


class MiddleServer:
    """Serves the middle stack to the clients of one federation (or, hierarchical, of one sub-server).

    Args:
        cfg: the federation's config.
        middle: the middle stack (built from ``cfg`` if None).
        clients: the client ids this server serves (all of them unless it is a sub-server).
        mode: the resolved ``server.parallelism`` (never ``auto``); ``hierarchical`` needs the
            server ranks' process group to be initialised (``flglm.distributed.init_server_group``).
        kill_at_step: fault injection (``faults.kill_server_at_step``): SIGKILL this process
            right after that optimizer step; 0: never.
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        middle: MiddleStack | None = None,
        clients: Sequence[int] | None = None,
        mode: str | None = None,
        kill_at_step: int = 0,
    ) -> None:
        self.cfg = cfg
        self._kill_at_step = kill_at_step
        self.mode = mode or cfg.server.parallelism
        if self.mode == "auto":
            raise ValueError("MiddleServer needs a resolved parallelism mode (see flglm.server.serving.parallelism)")
        self.clients = sorted(range(cfg.federation.num_clients) if clients is None else clients)
        if middle is None:
            middle = MiddleStack(cfg.model, plan_for(cfg.model, cfg.split), cfg.peft)
        self.middle = middle
        self.named_params = [(n, p) for n, p in middle.hf.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.optimizer = build_optimizer(self.params, cfg.optim) if self.params else None
        self.max_positions = max_positions_of(middle.hf.config)
        self.stats = ServerStats()
        self._fingerprint = fingerprint(cfg)
        self._lock = threading.RLock()
        self._pending: OrderedDict[tuple[int, int], _Pending] = OrderedDict()
        self._decoding = DecodeSessions(
            middle.hf.config, max_per_client=cfg.server.max_decode_sessions_per_client, idle_timeout_s=cfg.server.state_timeout_s
        )
        self._turn = threading.Condition()
        self._turn_owner: int | None = None
        self._turn_since = 0.0
        self._error: BaseException | None = None
        self.sync = (
            SubServerSync(
                self.params,
                self._lock,
                num_clients=cfg.federation.num_clients,
                sync_every=cfg.server.sync_every,
                sync_step=cfg.server.sync_step,
                on_error=self._abort,
            )
            if self.mode == "hierarchical"
            else None
        )
        self._rounds = AggregationRounds(combine=self.sync.combine if self.sync is not None else None)
        self._secure = SecureRounds(coordinator=self.sync) if cfg.crypto.enabled and cfg.crypto.secure_aggregation else None
        # Every expected client takes part in aggregation rounds from the start, so a client that
        # joins late is waited for instead of missing the first rounds; leaving ends that.
        for client_id in self.clients:
            self._rounds.join(client_id)
            if self._secure is not None:
                self._secure.join(client_id)
        self._joined: set[int] = set()
        self._left: set[int] = set()
        self._incarnations: dict[int, int] = {}
        self._alive_lock = threading.Lock()
        self._last_seen: dict[int, float] = {}
        self._in_flight: dict[int, int] = {}
        self._dropped: set[int] = set()
        self._dropped_at: dict[int, float] = {}
        self._watchdog_stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch_silence, name="flglm-client-watchdog", daemon=True)
        self._watchdog.start()
        self._checkpoints = checkpoint_dir(cfg.run_dir, "server")
        self._model_fingerprint = model_fingerprint(cfg, {n: list(p.shape) for n, p in self.named_params})
        self._checkpointed: set[int] = set()
        self._resume_offers: dict[int, list[int]] = {}
        self._resume_round: int | None = None
        self._resume_decided = threading.Event()
        self._client_metrics: dict[int, dict[str, float]] = {}
        self._tokenizer_fingerprint: str | None = None
        self._done = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flglm-compute")
        s = cfg.server
        self._batcher = (
            ClientBatcher(self, max_clients=s.max_clients_per_batch, window_s=s.batch_window_ms / 1000, timeout_s=s.request_timeout_s)
            if self.mode == "client_batching"
            else None
        )

    # ----------------------------------------------------------------- membership
    def hello(
        self,
        client_id: int,
        config_fingerprint: str,
        tokenizer_fingerprint: str,
        *,
        incarnation: int = 0,
        checkpoints: Sequence[int] = (),
    ) -> tuple[dict[str, Any], bool]:
        """Handshake: the client must run the same config and tokenizer as the federation.

        ``incarnation`` is a random number each client process draws once. A join of the
        incarnation already connected is a resent join and gets the same answer; a join of
        another incarnation while one is connected is a restarted client: the dead process's
        pending state is dropped and the new one takes its place. Returns the server's facts
        and whether this was a new join (not a resent one).

        With ``resume``, the first joins wait until every client has joined with the rounds of
        its checkpoints (``checkpoints``); then the server loads the newest round all parties
        have, and ``resume_round`` in every answer tells the clients which one to load (0: none).
        """
        if config_fingerprint != self._fingerprint:
            raise InvalidMessageError(
                f"client {client_id}: its configuration differs from the server's "
                f"(fingerprint {config_fingerprint[:12]} != {self._fingerprint[:12]}); "
                "start every process with the same config file and overrides"
            )
        if client_id not in self.clients:
            raise InvalidMessageError(f"client {client_id} is not served by this server (it serves clients {self.clients})")
        connected = client_id in self._joined and client_id not in self._left
        with self._lock:
            if self._tokenizer_fingerprint is None:
                self._tokenizer_fingerprint = tokenizer_fingerprint
            elif tokenizer_fingerprint != self._tokenizer_fingerprint:
                raise InvalidMessageError(f"client {client_id}: its tokenizer differs from the other clients'")
        fresh = not connected or self._incarnations.get(client_id) != incarnation
        if connected and fresh:
            log.warning("client %d joined again as a new process: dropping the old process's pending state", client_id)
            self._forget_client(client_id)
        if fresh:
            with self._alive_lock:
                self._last_seen[client_id] = time.monotonic()
            with self._lock:
                self._incarnations[client_id] = incarnation
                self._dropped.discard(client_id)
                self._dropped_at.pop(client_id, None)
                self._joined.add(client_id)
                self._left.discard(client_id)
            self._rounds.join(client_id)
            if self._secure is not None:
                self._secure.join(client_id)
            if self._batcher is not None:
                self._batcher.join(client_id)
            log.info("client %d joined (%d/%d)", client_id, len(self._joined), len(self.clients))
        resume_round = self._agree_on_resume(client_id, checkpoints) if self.cfg.resume else None
        info = {
            "resume_round": resume_round or 0,
            "next_round": self.next_round(),
            "hidden_size": self.middle.hidden_size,
            "server_layers": list(self.middle.plan.middle),
            "trainable": bool(self.params),
            "parallelism": self.mode,
            "parameter_names": [n for n, _ in self.named_params],
        }
        return info, fresh

    def next_round(self) -> int:
        """The first FedAvg round a client joining now takes part in.

        0 at a fresh start. A client joining later (a restarted process, which starts its
        training again) would otherwise count its rounds from 0, contribute to a round the others
        finished long ago and wait there forever, while they wait for it in theirs."""
        return self._secure.next_round() if self._secure is not None else self._rounds.next_round()

    def _agree_on_resume(self, client_id: int, checkpoints: Sequence[int]) -> int | None:
        """Wait for every client's checkpoint rounds; the newest round all parties share (loaded here)."""
        with self._lock:
            if self._resume_decided.is_set():
                return self._resume_round  # a client rejoining later continues from the current state
            self._resume_offers[client_id] = sorted({int(r) for r in checkpoints})
            everyone = len(self._resume_offers) == len(self.clients)
        if everyone:
            try:
                own = rounds_in(self._checkpoints, "pt")
                chosen = consistent_round(own, self._resume_offers.values())
                if chosen is not None:
                    self.restore(load_checkpoint(checkpoint_path(self._checkpoints, chosen, "pt"), expect_model=self._model_fingerprint))
                    log.info("resuming from round %d (server has %s, clients %s)", chosen, own, self._resume_offers)
                else:
                    log.info("resume: no checkpoint round common to all parties (server %s, clients %s); starting fresh", own, self._resume_offers)
                self._resume_round = chosen
            except BaseException as exc:
                self._abort(exc)
                raise
            finally:
                self._resume_decided.set()
        elif not self._resume_decided.wait(timeout=self.cfg.server.startup_timeout_s):
            raise TimeoutError(
                f"client {client_id}: resume waits for every client's checkpoints; only {len(self._resume_offers)} of "
                f"{len(self.clients)} joined within server.startup_timeout_s={self.cfg.server.startup_timeout_s}"
            )
        if self._error is not None:
            raise RuntimeError(f"the server could not resume: {self._error}")
        return self._resume_round

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_state(self, rounds: int) -> dict[str, Any]:
        """Everything a restarted server needs to continue exactly: trainable weights, optimizer,
        RNG, counters. Taken under the lock, at a round, when no client's step is in flight."""
        with self._lock:
            return {
                "format": 1,
                "rounds": rounds,
                "model": self._model_fingerprint,
                "parameters": {n: p.detach().clone() for n, p in self.named_params},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None,
                "rng": torch.get_rng_state(),
                "stats": {k: v for k, v in self.stats.__dict__.items() if k != "started"},
                "aggregation_rounds": self._rounds.completed + (self._secure.completed if self._secure else 0),
            }

    def restore(self, state: dict[str, Any]) -> None:
        """Load a :meth:`checkpoint_state` (already checked to fit this model and split)."""
        with self._lock:
            named = dict(self.named_params)
            saved = state["parameters"]
            if sorted(saved) != sorted(named):
                raise CheckpointError(f"checkpoint of round {state['rounds']} holds parameters {sorted(saved)[:3]}..., expected {sorted(named)[:3]}...")
            with torch.no_grad():
                for name, value in saved.items():
                    named[name].copy_(value)
            if self.optimizer is not None and state["optimizer"] is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            for key, value in state["stats"].items():
                if hasattr(self.stats, key):
                    setattr(self.stats, key, value)
            self._rounds.completed = int(state["aggregation_rounds"])
            self._checkpointed.add(int(state["rounds"]))

    def _round_done(self, round_index: int) -> None:
        """A FedAvg round is complete (called before any client gets the average): checkpoint if due."""
        every = self.cfg.server.checkpoint_every
        rounds = round_index + 1
        if not every or rounds % every:
            return
        with self._lock:
            if rounds in self._checkpointed:
                return
            self._checkpointed.add(rounds)
            save_atomically(self.checkpoint_state(rounds), checkpoint_path(self._checkpoints, rounds, "pt"))
            prune(self._checkpoints, "pt", self.cfg.server.checkpoint_keep)
        log.info("checkpoint of round %d written (server steps %d, rss %.1f MB)", rounds, self.stats.steps, resident_mb())

    # ------------------------------------------------------------------ liveness
    def message_begins(self, client_id: int) -> None:
        """A message of ``client_id`` arrived (called by the endpoint for every message)."""
        with self._alive_lock:  # not the model's lock: intake must not wait for a computation
            self._last_seen[client_id] = time.monotonic()
            self._in_flight[client_id] = self._in_flight.get(client_id, 0) + 1

    def message_ends(self, client_id: int) -> None:
        with self._alive_lock:
            self._last_seen[client_id] = time.monotonic()
            self._in_flight[client_id] = max(0, self._in_flight.get(client_id, 0) - 1)

    def check_member(self, client_id: int, kind: str) -> None:
        """Only a joined client's messages are handled (a resent ``leave`` too, after it left)."""
        if kind == "join":
            return
        if client_id in self._dropped and kind != "leave":
            raise InvalidMessageError(
                f"client {client_id} was dropped after server.client_timeout_s={self.cfg.server.client_timeout_s} "
                "without a message; join again"
            )
        if client_id not in self._joined or (client_id in self._left and kind != "leave"):
            raise InvalidMessageError(f"client {client_id} has not joined the federation (or has left): a {kind!r} message needs a join first")

    def _watch_silence(self) -> None:
        timeout = self.cfg.server.client_timeout_s
        while not self._watchdog_stop.wait(min(1.0, timeout / 4)):
            now = time.monotonic()
            members = set(self._joined) - set(self._left)
            with self._alive_lock:
                silent = [
                    c
                    for c in members
                    if not self._in_flight.get(c) and now - self._last_seen.get(c, now) > timeout
                ]
            for client_id in silent:
                self.drop_client(client_id, f"no message for {timeout:.0f}s (server.client_timeout_s)")
            self._finish_if_everyone_left()  # a dropped client's time to join again may have run out

    def drop_client(self, client_id: int, why: str) -> None:
        """Take a client that stopped answering out of the federation; the others go on without it."""
        with self._lock:
            if client_id in self._left or client_id not in self._joined:
                return
            self._left.add(client_id)
            self._dropped.add(client_id)
            self._dropped_at[client_id] = time.monotonic()
            self.stats.dropped_clients += 1
        log.warning("client %d dropped from the federation: %s; the others go on, it may join again", client_id, why)
        self._forget_client(client_id)
        self._rounds.leave(client_id)
        if self._secure is not None:
            self._secure.leave(client_id)
        self._finish_if_everyone_left()

    def _finish_if_everyone_left(self) -> None:
        """Done once every expected client has joined and left (or was dropped), except that a
        client dropped less than ``server.rejoin_timeout_s`` ago is still waited for."""
        with self._lock:
            now = time.monotonic()
            rejoin = self.cfg.server.rejoin_timeout_s
            awaited = [c for c in self._dropped if now - self._dropped_at.get(c, now) < rejoin]
            if len(self._joined) >= len(self.clients) and self._left >= self._joined and not awaited:
                self._done.set()

    def _forget_client(self, client_id: int) -> None:
        """Free what the server holds for a client's process: pending forwards, decoding caches, its turn."""
        with self._lock:
            freed = self._drop_client_state(client_id)
            self.stats.freed_pending += freed
            self._decoding.drop_client(client_id)
        if freed:
            log.warning("client %d: freed %d pending forward(s) (autograd state awaiting a backward)", client_id, freed)
        self._release_turn(client_id, discard_grads=True)
        if self._batcher is not None:
            self._batcher.leave(client_id)

    def leave(self, client_id: int, metrics: dict[str, float]) -> None:
        with self._lock:
            self._left.add(client_id)
            self._client_metrics[client_id] = {k: float(v) for k, v in metrics.items()}
        self._forget_client(client_id)
        self._rounds.leave(client_id)
        if self._secure is not None:
            self._secure.leave(client_id)
        log.info("client %d left", client_id)
        self._finish_if_everyone_left()

    def _abort(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def wait_until_done(self, *, timeout: float) -> None:
        """Block until every expected client has joined and left; joins are bounded by ``timeout``.

        Hierarchical: then until every sub-server is done and the middle stacks are averaged."""
        deadline = time.monotonic() + timeout
        while not self._done.wait(timeout=1.0):
            if len(self._joined) < len(self.clients) and time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(self._joined)} of {len(self.clients)} clients joined within "
                    f"server.startup_timeout_s={timeout}"
                )
        if self._error is not None:
            raise RuntimeError(f"the server stopped: {self._error}") from self._error
        if self.sync is not None:
            self.sync.finish()  # each collective is bounded by server.sync_timeout_s

    # ------------------------------------------------------------------- the turn
    def _acquire_turn(self, client_id: int) -> None:
        with self._turn:
            while self._turn_owner not in (None, client_id):
                if time.monotonic() - self._turn_since > self.cfg.server.state_timeout_s:
                    stale = self._turn_owner
                    log.warning("client %s held the server for over %.0fs; releasing its turn", stale, self.cfg.server.state_timeout_s)
                    with self._lock:
                        self._drop_client_state(stale)
                        self._zero_grads()
                    break
                self._turn.wait(timeout=0.5)
            if self._turn_owner != client_id:
                self._turn_owner = client_id
                self._turn_since = time.monotonic()

    def _release_turn(self, client_id: int, *, discard_grads: bool = False) -> None:
        with self._turn:
            if self._turn_owner == client_id:
                if discard_grads:
                    with self._lock:
                        self._zero_grads()
                self._turn_owner = None
                self._turn.notify_all()

    # ------------------------------------------------------------ forward/backward
    def _check(
        self, header: object, hidden: object, mask: object, pos: object, *, past: int = 0, prefix: object = None
    ) -> RequestHeader:
        try:
            header = check_header(header)
            if prefix is not None:
                kv_heads, head_dim = kv_shape(self.middle.hf.config)
                prefix_seen = _finite(prefix) if self._skips(prefix) else prefix
                check_prefix(header, prefix_seen, layers=len(self.middle.plan.middle), kv_heads=kv_heads, head_dim=head_dim)
            check_forward(
                header,
                _finite(hidden) if self._skips(hidden) else hidden,
                mask,
                pos,
                hidden_size=self.middle.hidden_size,
                max_batch_size=self.cfg.server.max_batch_size,
                max_positions=self.max_positions,
                mask_length=past + hidden.shape[1] if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else None,
            )
        except InvalidMessageError:
            self.stats.rejected += 1
            raise
        return header

    def _compute(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the server's one compute thread and wait for it.

        RPC requests arrive on a pool of threads; running all model work on one thread keeps
        its memory reuse warm (glibc hands each thread its own arena, so tensors allocated on
        one RPC thread and freed on another went back to the OS), which measured here made
        the middle stack's forward ~1.5x slower than in a single-threaded process.
        """
        return self._executor.submit(fn, *args).result()

    def close(self) -> None:
        self._watchdog_stop.set()
        if self._batcher is not None:
            self._batcher.close()
        self._executor.shutdown(wait=True)

    # ------------------------------------------------- used by the client batcher
    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the compute thread without waiting for it."""
        self._executor.submit(fn)

    def run_middle(
        self, header: RequestHeader, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, *, row_prefixes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The middle stack on a gathered batch; ``row_prefixes`` (P-tuning v2) holds each row's
        prefixes, ``[rows, layers, 2, kv_heads, prefix_length, head_dim]``."""
        with self._lock:
            if row_prefixes is None:
                return self._run(header, hidden, mask, pos)
            cache = self.middle.prefix_cache_rows(row_prefixes)
            return self._run(header, hidden, mask, pos, cache=cache, prefix_length=row_prefixes.shape[-2])

    def count(self, kind: str, n: int, *tensors: torch.Tensor) -> None:
        with self._lock:
            setattr(self.stats, kind, getattr(self.stats, kind) + n)
            self.stats.bytes_in += nbytes(*tensors)

    def discard_grads(self) -> None:
        with self._lock:
            self._zero_grads()

    def _run(
        self,
        header: RequestHeader,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        cache: Any = None,
        prefix: torch.Tensor | None = None,
        prefix_length: int = 0,
    ) -> torch.Tensor:
        """The middle stack; ``prefix`` (P-tuning v2) goes into a fresh cache in front of the
        tokens, ``prefix_length`` says how many positions of ``cache`` a decoding session's prefix took."""
        if prefix is not None:
            cache, prefix_length = self.middle.prefix_cache(prefix, hidden.shape[0]), prefix.shape[-2]
        dtype = AUTOCAST_DTYPES[header.autocast]
        ctx = autocast_for(self.middle.device, dtype)
        with ctx:
            return self.middle(hidden, mask, pos.expand(hidden.shape[0], -1), cache, prefix_length)

    def _skips(self, tensor: object) -> bool:
        """``server.nonfinite=skip`` and ``tensor`` is a float tensor holding NaN or Inf."""
        return (
            self.cfg.server.nonfinite == "skip"
            and isinstance(tensor, torch.Tensor)
            and tensor.is_floating_point()
            and not bool(torch.isfinite(tensor).all())
        )

    def _skip(self, header: RequestHeader, what: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Answer a request whose ``what`` holds NaN/Inf with zeros; it never touches the model."""
        self.stats.skipped_nonfinite += 1
        log.warning("%s: %s contain NaN or Inf: skipped (server.nonfinite=skip), answered with zeros", header.describe(), what)
        return torch.zeros(shape, dtype=dtype)

    def _answer(self, outputs: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The middle's output in the request's dtype, compact for the wire; both counted in the stats."""
        self.stats.bytes_in += nbytes(hidden, mask, pos)
        result = wire(outputs.to(hidden.dtype))
        self.stats.bytes_out += nbytes(result)
        return result

    def forward(
        self, header: RequestHeader, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, prefix: torch.Tensor | None = None
    ) -> torch.Tensor | Future:
        """Training forward: keeps the autograd state until the matching ``backward``.

        With client-batching the answer is a future, resolved when the client's group has run."""
        header = self._check(header, hidden, mask, pos, prefix=prefix)
        if self._batcher is not None:
            return self._batcher.forward(header, hidden, mask, pos, prefix)
        self._acquire_turn(header.client_id)
        return self._compute(self._forward_now, header, hidden, mask, pos, prefix)

    def _forward_now(
        self, header: RequestHeader, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, prefix: torch.Tensor | None = None
    ) -> torch.Tensor:
        with self._lock:
            self._sweep()
            key = (header.client_id, header.request_id)
            if key in self._pending:
                self.stats.rejected += 1
                raise InvalidMessageError(f"{header.describe()}: a forward with this id is already pending")
            self._evict_over_limit(header.client_id)
            bad_hidden = self._skips(hidden)
            if bad_hidden or self._skips(prefix):
                zeros = self._skip(header, "hidden states" if bad_hidden else "prefixes", hidden.shape, hidden.dtype)
                self._pending[key] = _Pending(torch.zeros_like(hidden), zeros, time.monotonic(), prefix, skipped=True)
                return self._answer(zeros, hidden, mask, pos)
            self.middle.train()
            inputs = hidden.detach().requires_grad_(hidden.is_floating_point())
            prefix_in = prefix.detach().requires_grad_() if prefix is not None else None
            with torch.enable_grad():
                outputs = self._run(header, inputs, mask, pos, prefix=prefix_in)
            self._pending[key] = _Pending(inputs, outputs, time.monotonic(), prefix_in)
            if self.sync is not None:
                self.sync.add_samples(hidden.shape[0])
            self.stats.forwards += 1
            return self._answer(outputs, hidden, mask, pos)

    def infer(
        self, header: RequestHeader, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, prefix: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Evaluation forward: no_grad, nothing kept."""
        header = self._check(header, hidden, mask, pos, prefix=prefix)
        return self._compute(self._infer_now, header, hidden, mask, pos, prefix)

    def _infer_now(
        self, header: RequestHeader, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, prefix: torch.Tensor | None = None
    ) -> torch.Tensor:
        with self._lock, torch.no_grad():
            if self._skips(hidden) or self._skips(prefix):
                return self._answer(self._skip(header, "hidden states or prefixes", hidden.shape, hidden.dtype), hidden, mask, pos)
            self.middle.eval()
            outputs = self._run(header, hidden, mask, pos, prefix=prefix)
            self.stats.inferences += 1
            return self._answer(outputs, hidden, mask, pos)

    # ------------------------------------------------------------------ generation
    def decode(
        self,
        header: RequestHeader,
        session: int,
        past: int,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One generation step of a decoding session: the middle stack on the new tokens' hidden
        states, attending to the ``past`` tokens its cache holds for the session (no_grad).

        ``mask`` covers the cached and the new tokens. Like ``infer`` it needs no turn: it
        changes no weights and keeps no autograd state. P-tuning v2: the first step (``past``
        0) carries the prefixes, which the session's cache keeps.
        """
        header = self._check(header, hidden, mask, pos, past=past, prefix=prefix)
        return self._compute(self._decode_now, header, session, past, hidden, mask, pos, prefix)

    def _decode_now(
        self,
        header: RequestHeader,
        session: int,
        past: int,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        prefix: torch.Tensor | None,
    ) -> torch.Tensor:
        with self._lock, torch.no_grad():
            try:
                if self._skips(hidden) or self._skips(prefix):
                    # skipping would leave the session's cache a token short: refuse instead
                    raise InvalidMessageError(f"{header.describe()}: hidden states or prefixes of a decoding step contain NaN or Inf")
                entry = self._decoding.session_for(header.client_id, session, past=past, batch=hidden.shape[0])
                if prefix is not None and past != 0:
                    raise InvalidMessageError(f"{header.describe()}: prefixes come with a session's first step only")
            except InvalidMessageError:
                self.stats.rejected += 1
                raise
            self.middle.eval()
            try:
                if prefix is not None:
                    entry.cache = self.middle.prefix_cache(prefix, hidden.shape[0])
                    entry.prefix_length = prefix.shape[-2]
                outputs = self._run(header, hidden, mask, pos, cache=entry.cache, prefix_length=entry.prefix_length)
            except BaseException:
                self._decoding.end(header.client_id, session)  # a half-updated cache is useless
                raise
            entry.length += hidden.shape[1]
            self.stats.decodes += 1
            return self._answer(outputs, hidden, mask, pos)

    def end_decoding(self, client_id: int, session: int) -> None:
        """Free a decoding session's cache (the client's generation is done)."""
        with self._lock:
            self._decoding.end(client_id, session)

    def decode_sessions(self) -> int:
        with self._lock:
            return len(self._decoding)

    def backward(self, header: RequestHeader, grad: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | Future:
        """Backpropagate ``grad`` (d loss / d outputs) and return d loss / d inputs (and, with
        P-tuning v2, d loss / d prefixes)."""
        try:
            header = check_header(header)
        except InvalidMessageError:
            self.stats.rejected += 1
            raise
        if self._batcher is not None:
            return self._batcher.backward(header, grad)
        return self._compute(self._backward_now, header, grad)

    def _backward_now(self, header: RequestHeader, grad: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            key = (header.client_id, header.request_id)
            pending = self._pending.get(key)
            if pending is None:
                self.stats.rejected += 1
                raise InvalidMessageError(
                    f"{header.describe()}: no pending forward (never sent, already backpropagated, or timed out)"
                )
            skip = self._skips(grad)
            try:
                check_gradient(header, _finite(grad) if skip else grad, pending.outputs)
            except InvalidMessageError:
                self.stats.rejected += 1
                raise
            del self._pending[key]
            self.stats.bytes_in += nbytes(grad)
            if pending.skipped or skip:
                # a skipped forward has no graph; a non-finite gradient is not applied
                zeros = self._skip(header, "gradient", pending.inputs.shape, pending.inputs.dtype) if skip else torch.zeros_like(pending.inputs)
                if pending.prefix is None:
                    return wire(zeros)
                return wire(zeros), wire(torch.zeros_like(pending.prefix))
            pending.outputs.backward(grad.to(pending.outputs.dtype))
            self.stats.backwards += 1
            grad_in = pending.inputs.grad
            if grad_in is None:
                grad_in = torch.zeros_like(pending.inputs)
            result = wire(grad_in)
            self.stats.bytes_out += nbytes(result)
            if pending.prefix is None:
                return result
            grad_prefix = pending.prefix.grad if pending.prefix.grad is not None else torch.zeros_like(pending.prefix)
            grad_prefix = wire(grad_prefix)
            self.stats.bytes_out += nbytes(grad_prefix)
            return result, grad_prefix

    # ------------------------------------------------------------------ optimizer
    def grad_norms(self, client_id: int) -> torch.Tensor:
        """Per-parameter gradient norms in ``hello()['parameter_names']`` order (-1: no gradient)."""
        with self._lock:
            norms = grad_norms(self.named_params)
            return torch.stack([norms.get(n, torch.tensor(-1.0)) for n, _ in self.named_params]) if self.named_params else torch.zeros(0)

    def step(
        self, client_id: int, client_step: int, total_steps: int, grad_scale: float = 1.0, clip_value: float | None = None
    ) -> Future | None:
        """Apply the accumulated gradients of ``client_id``'s step, then hand the turn on.

        ``grad_scale`` is the global-norm clipping coefficient the client computed over both
        sides' gradients; the LR schedule is evaluated at the client's own step index.
        """
        if self._batcher is not None:
            return self._batcher.step(client_id, client_step, total_steps, grad_scale, clip_value)
        self._compute(self.step_now, client_step, total_steps, grad_scale, clip_value)
        self._release_turn(client_id)
        return None

    def step_now(self, client_step: int, total_steps: int, grad_scale: float, clip_value: float | None) -> None:
        """One optimizer step of the server's parameters (also the client batcher's group step)."""
        with self._lock:
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

    # ---------------------------------------------------------------- aggregation
    def aggregation_begin(self, client_id: int, round_index: int) -> Future:
        """Secure aggregation: answered with the round's plan once every active client has begun it."""
        if self._secure is None:
            raise InvalidMessageError(f"client {client_id}: this federation does not run secure aggregation")
        return self._secure.begin(client_id, round_index).then(lambda done: [plan_tensor(done.wait())])

    def aggregation_upload(self, client_id: int, round_index: int, attempt: int, vector: torch.Tensor, weight: float) -> Future:
        """Answered with ``[status, average]`` when every participant of the round has uploaded.

        Plain FedAvg: ``vector`` is the client's parameters. Secure aggregation: the masked upload;
        the server only ever sums masked vectors, and a participant that left before uploading
        makes the round start again without it (status "redo" with the new plan).
        """
        if self._secure is None:
            future = self._rounds.contribute(client_id, round_index, vector, weight)
            return future.then(lambda done: self._answer_round(round_index, done, plain_result_tensors))
        upload = self._secure.upload(client_id, round_index, attempt, vector, weight)
        return upload.then(lambda done: self._answer_round(round_index, done, result_tensors))

    def _answer_round(self, round_index: int, done: Future, to_tensors: Callable[[Any], list[torch.Tensor]]) -> list[torch.Tensor]:
        # Runs for each contributor as the round resolves, on one thread: the first one writes the
        # checkpoint before any contributor's answer leaves.
        result = done.wait()
        if getattr(result, "status", "done") == "done":
            self._round_done(round_index)
        return to_tensors(result)

    # ---------------------------------------------------------------- bookkeeping
    def _sweep(self) -> None:
        now = time.monotonic()
        timeout = self.cfg.server.state_timeout_s
        for key in [k for k, p in self._pending.items() if now - p.created > timeout]:
            del self._pending[key]
            self.stats.evicted += 1
            log.warning("released the state of client %d request %d: no backward within %.0fs", *key, timeout)

    def _evict_over_limit(self, client_id: int) -> None:
        mine = [k for k in self._pending if k[0] == client_id]
        while len(mine) >= self.cfg.server.max_pending_per_client:
            oldest = mine.pop(0)
            del self._pending[oldest]
            self.stats.evicted += 1
            log.warning("client %d has too many forwards without backward; evicted request %d", *oldest)

    def _drop_client_state(self, client_id: int | None) -> int:
        """Free a client's pending forwards; how many there were."""
        keys = [k for k in self._pending if k[0] == client_id]
        for key in keys:
            del self._pending[key]
        return len(keys)

    def _zero_grads(self) -> None:
        """Discard a half-done step's gradients (its client left or timed out)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def summary(self) -> dict[str, Any]:
        return {
            "server": self.stats.as_dict()
            | batching_stats(self._batcher)
            | self._decoding.stats()
            | (self.sync.stats() if self.sync is not None else {})
            | {"aggregation_rounds": self._rounds.completed + (self._secure.completed if self._secure else 0)},
            "clients": {str(k): v for k, v in sorted(self._client_metrics.items())},
        }


def resident_mb() -> float:
    """This process's resident memory in MB (Linux; NaN elsewhere), for the logs and the soak benchmark."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _finite(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with NaN/Inf replaced by 0: checked for everything but finiteness (``server.nonfinite=skip``)."""
    return torch.nan_to_num(tensor, nan=0.0, posinf=0.0, neginf=0.0)
