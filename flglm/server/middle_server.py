"""The server of one federation (or, hierarchical, of one sub-server): its parts, put together.

Typed methods: ``hello``, ``forward``, ``infer``, ``decode``/``end_decoding``, ``backward``,
``grad_norms``, ``step``, ``aggregation_begin``/``aggregation_upload``, ``leave``. Clients reach them
only through :class:`flglm.server.endpoint.ServerEndpoint`, which decodes (and, with encryption,
opens) each message. The work is done by the parts: the compute core (:mod:`~flglm.server.middle`),
the serving mode (:mod:`~flglm.server.serving`), membership (:mod:`~flglm.server.membership`),
resume (:mod:`~flglm.server.resume_agreement`) and the FedAvg rounds (:mod:`flglm.aggregation`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.futures import Future

from flglm.aggregation.fedavg import AggregationRounds
from flglm.aggregation.secure_rounds import SecureRounds
from flglm.config import RunConfig, fingerprint
from flglm.link.crossing import Crossing
from flglm.link.messages import InvalidMessageError, RequestHeader
from flglm.link.protocol import plain_result_tensors, plan_tensor, result_tensors
from flglm.models.split import MiddleStack, plan_for
from flglm.server.membership import Membership
from flglm.server.middle import Grads, MiddleCompute
from flglm.server.resume_agreement import ResumeAgreement
from flglm.server.serving import Answer
from flglm.server.serving.hierarchy import SubServerSync
from flglm.server.serving.parallelism import make_serving
from flglm.server.stats import ServerStats

log = logging.getLogger("flglm.server")


class MiddleServer:
    """Serves the middle stack to the clients of one federation (or of one sub-server).

    Args:
        cfg: the federation's config.
        middle: the middle stack (built from ``cfg`` if None).
        clients: the client ids this server serves (all of them unless it is a sub-server).
        mode: the resolved ``server.parallelism`` (never ``auto``); ``hierarchical`` needs the
            server ranks' process group (``flglm.distributed.init_server_group``).
        kill_at_step: fault injection (``faults.kill_server_at_step``): SIGKILL after that optimizer step.
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
        self.mode = mode or cfg.server.parallelism
        if self.mode == "auto":
            raise ValueError("MiddleServer needs a resolved parallelism mode (see flglm.server.serving.parallelism)")
        self.stats = ServerStats()
        self.compute = MiddleCompute(
            cfg, middle or MiddleStack(cfg.model, plan_for(cfg.model, cfg.split), cfg.peft), self.stats, kill_at_step=kill_at_step
        )
        self.middle = self.compute.middle
        self.members = Membership(
            range(cfg.federation.num_clients) if clients is None else clients, cfg.server, self.stats, on_silent=self.drop_client
        )
        self.clients = self.members.clients
        self._fingerprint = fingerprint(cfg)
        self.sync = self._sub_server_sync() if self.mode == "hierarchical" else None
        if self.sync is not None:
            self.compute.on_samples = self.sync.add_samples
        self._rounds = AggregationRounds(combine=self.sync.combine if self.sync is not None else None)
        self._secure = SecureRounds(coordinator=self.sync) if cfg.crypto.enabled and cfg.crypto.secure_aggregation else None
        # Every expected client takes part in aggregation rounds from the start, so a client that
        # joins late is waited for instead of missing the first rounds; leaving ends that.
        for client_id in self.clients:
            self._rounds.join(client_id)
            if self._secure is not None:
                self._secure.join(client_id)
        self.resume = ResumeAgreement(
            cfg, self.compute, clients=self.clients, rounds_completed=(self._rounds_completed, self._set_rounds), on_error=self.members.abort
        )
        self.serving = make_serving(self.mode, self.compute, clients=self.clients, settings=cfg.server)
        self._client_metrics: dict[int, dict[str, float]] = {}

    def _sub_server_sync(self) -> SubServerSync:
        s = self.cfg.server
        sync = SubServerSync(
            self.compute.params, self.compute.lock, num_clients=self.cfg.federation.num_clients,
            sync_every=s.sync_every, sync_step=s.sync_step, on_error=lambda err: self.members.abort(err),
        )  # fmt: skip
        return sync

    # the compute core's parts that callers (jobs, tests, benchmarks) read
    @property
    def named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return self.compute.named_params

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.compute.params

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.compute.optimizer

    # ----------------------------------------------------------------- membership
    def hello(
        self, client_id: int, config_fingerprint: str, tokenizer_fingerprint: str, *, incarnation: int = 0, checkpoints: Sequence[int] = ()
    ) -> tuple[dict[str, Any], bool]:
        """Handshake: the client must run the same config and tokenizer as the federation.

        A join of the incarnation already connected is a resent join and gets the same answer; a
        join of another incarnation while one is connected is a restarted client: the dead
        process's pending state is dropped and the new one takes its place. Returns the server's
        facts and whether this was a new join (not a resent one).
        """
        if config_fingerprint != self._fingerprint:
            raise InvalidMessageError(
                f"client {client_id}: its configuration differs from the server's "
                f"(fingerprint {config_fingerprint[:12]} != {self._fingerprint[:12]}); start every process with the same config file and overrides"
            )
        if client_id not in self.clients:
            raise InvalidMessageError(f"client {client_id} is not served by this server (it serves clients {self.clients})")
        self.members.check_tokenizer(client_id, tokenizer_fingerprint)
        connected, fresh = self.members.is_connected(client_id), self.members.is_fresh(client_id, incarnation)
        if connected and fresh:
            log.warning("client %d joined again as a new process: dropping the old process's pending state", client_id)
            self._forget_client(client_id)
        if fresh:
            self.members.admit(client_id, incarnation)
            self._rounds.join(client_id)
            if self._secure is not None:
                self._secure.join(client_id)
            self.serving.join(client_id)
            log.info("client %d joined (%d/%d)", client_id, len(self.members.joined), len(self.clients))
        resume_round = self.resume.agree(client_id, checkpoints) if self.cfg.resume else None
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
        """The first FedAvg round a client joining now takes part in (0 at a fresh start): a
        restarted process must not contribute to a round the others finished long ago."""
        return self._secure.next_round() if self._secure is not None else self._rounds.next_round()

    def check_member(self, client_id: int, kind: str) -> None:
        self.members.check_member(client_id, kind)

    def message_begins(self, client_id: int) -> None:
        self.members.message_begins(client_id)

    def message_ends(self, client_id: int) -> None:
        self.members.message_ends(client_id)

    def drop_client(self, client_id: int, why: str) -> None:
        """Take a client that stopped answering out of the federation; the others go on without it."""
        if not self.members.drop(client_id):
            return
        log.warning("client %d dropped from the federation: %s; the others go on, it may join again", client_id, why)
        self._gone(client_id)

    def leave(self, client_id: int, metrics: dict[str, float]) -> None:
        self.members.leave(client_id)
        self._client_metrics[client_id] = {k: float(v) for k, v in metrics.items()}
        log.info("client %d left", client_id)
        self._gone(client_id)

    def _gone(self, client_id: int) -> None:
        self._forget_client(client_id)
        self._rounds.leave(client_id)
        if self._secure is not None:
            self._secure.leave(client_id)
        self.members.finish_if_everyone_left()

    def _forget_client(self, client_id: int) -> None:
        """Free what the server holds for a client's process: pending forwards, decoding caches, its turn or group place."""
        freed = self.compute.forget(client_id)
        self.stats.freed_pending += freed
        if freed:
            log.warning("client %d: freed %d pending forward(s) (autograd state awaiting a backward)", client_id, freed)
        self.serving.leave(client_id)

    def wait_until_done(self, *, timeout: float) -> None:
        """Block until every expected client has joined and left; hierarchical: then until every
        sub-server is done and the middle stacks are averaged."""
        self.members.wait_until_done(timeout=timeout)
        if self.sync is not None:
            self.sync.finish()  # each collective is bounded by server.sync_timeout_s

    # --------------------------------------------------------- checkpoints, resume
    def checkpoint_state(self, rounds: int) -> dict[str, Any]:
        return self.resume.checkpoint_state(rounds)

    def restore(self, state: dict[str, Any]) -> None:
        self.resume.restore(state)

    def _rounds_completed(self) -> int:
        return self._rounds.completed + (self._secure.completed if self._secure else 0)

    def _set_rounds(self, completed: int) -> None:
        self._rounds.completed = completed

    # ------------------------------------------------------------------ training
    def forward(self, header: RequestHeader, crossing: Crossing) -> Answer:
        """Training forward: keeps the autograd state until the matching ``backward`` (a future under client batching)."""
        return self.serving.forward(self.compute.intake.crossing(header, crossing), crossing)

    def backward(self, header: RequestHeader, grad: torch.Tensor) -> Grads | Future:
        """Backpropagate ``grad`` (d loss / d outputs): d loss / d inputs (and, P-tuning v2, d loss / d prefixes)."""
        return self.serving.backward(self.compute.intake.header(header), grad)

    def grad_norms(self, client_id: int) -> torch.Tensor:
        """Per-parameter gradient norms in ``hello()['parameter_names']`` order (-1: no gradient)."""
        return self.compute.grad_norms()

    def step(self, client_id: int, client_step: int, total_steps: int, grad_scale: float = 1.0, clip_value: float | None = None) -> Future | None:
        """Apply the accumulated gradients of ``client_id``'s step (``grad_scale``: the global-norm
        clipping coefficient over both sides), then hand the turn on."""
        return self.serving.step(client_id, client_step, total_steps, grad_scale, clip_value)

    # ------------------------------------------------------- evaluation, generation
    def infer(self, header: RequestHeader, crossing: Crossing) -> torch.Tensor:
        """Evaluation forward: no_grad, nothing kept, no turn needed."""
        header = self.compute.intake.crossing(header, crossing)
        return self.compute.run(self.compute.infer, header, crossing)

    def decode(self, header: RequestHeader, session: int, past: int, crossing: Crossing) -> torch.Tensor:
        """One generation step of a decoding session (no_grad, no turn): the new tokens' middle
        output, attending to the ``past`` tokens the session's cache holds; ``crossing``'s mask
        covers the cached and the new tokens. P-tuning v2: the first step carries the prefixes."""
        header = self.compute.intake.crossing(header, crossing, past=past)
        return self.compute.run(self.compute.decode, header, session, past, crossing)

    def end_decoding(self, client_id: int, session: int) -> None:
        """Free a decoding session's cache (the client's generation is done)."""
        with self.compute.lock:
            self.compute.decoding.end(client_id, session)

    def decode_sessions(self) -> int:
        with self.compute.lock:
            return len(self.compute.decoding)

    # ---------------------------------------------------------------- aggregation
    def aggregation_begin(self, client_id: int, round_index: int, fits_narrow: bool = False) -> Future:
        """Secure aggregation: answered with the round's plan once every active client has begun it."""
        if self._secure is None:
            raise InvalidMessageError(f"client {client_id}: this federation does not run secure aggregation")
        return self._secure.begin(client_id, round_index, fits_narrow).then(lambda done: [plan_tensor(done.wait())])

    def aggregation_upload(self, client_id: int, round_index: int, attempt: int, vector: torch.Tensor, weight: float) -> Future:
        """Answered with ``[status, average]`` when every participant of the round has uploaded (plain
        FedAvg: the parameters; secure: the masked upload, and a round redone without a leaver)."""
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
            self.resume.round_done(round_index)
        return to_tensors(result)

    # ------------------------------------------------------------------ reporting
    def pending_count(self) -> int:
        with self.compute.lock:
            return len(self.compute.pending)

    def summary(self) -> dict[str, Any]:
        with self.compute.lock:
            decoding = self.compute.decoding.stats()
        return {
            "server": self.stats.as_dict()
            | self.serving.stats()
            | decoding
            | (self.sync.stats() if self.sync is not None else {})
            | {"aggregation_rounds": self._rounds_completed()},
            "clients": {str(k): v for k, v in sorted(self._client_metrics.items())},
        }

    def close(self) -> None:
        self.members.close()
        self.serving.close()
        self.compute.close()
