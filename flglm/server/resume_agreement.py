"""The server's side of resuming: its checkpoints at FedAvg rounds, and the round every party agrees to resume from.

With ``resume``, the first joins wait until every client has joined with the rounds of its
checkpoints; the server then loads the newest round all parties have (``flglm.resume``), and
``resume_round`` in every welcome tells the clients which one to load (0: none).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from flglm.config import RunConfig
from flglm.resume import CheckpointError, checkpoint_path, consistent_round, load_checkpoint, model_fingerprint, prune, rounds_in, save_atomically
from flglm.run_layout import checkpoint_dir, server_memory_path
from flglm.server.middle import MiddleCompute
from flglm.server.stats import resident_mb

log = logging.getLogger("flglm.server")


class ResumeAgreement:
    """Checkpoints of one server and the resume round.

    Args:
        compute: the compute core whose weights, optimizer and counters a checkpoint holds.
        clients: the clients whose checkpoint rounds are waited for.
        rounds_completed: reads and sets the count of completed FedAvg rounds (saved with the checkpoint).
        on_error: called if loading the agreed checkpoint fails (the server aborts).
    """

    def __init__(
        self,
        cfg: RunConfig,
        compute: MiddleCompute,
        *,
        clients: Sequence[int],
        rounds_completed: tuple[Callable[[], int], Callable[[int], None]],
        on_error: Callable[[BaseException], None],
    ) -> None:
        self._cfg = cfg
        self._compute = compute
        self._clients = list(clients)
        self._get_rounds, self._set_rounds = rounds_completed
        self._on_error = on_error
        self._dir = checkpoint_dir(cfg.run_dir, "server")
        self._memory = server_memory_path(cfg.run_dir)
        self.model_fingerprint = model_fingerprint(cfg, {n: list(p.shape) for n, p in compute.named_params})
        self._checkpointed: set[int] = set()
        self._offers: dict[int, list[int]] = {}
        self._round: int | None = None
        self._decided = threading.Event()
        self._failed: BaseException | None = None
        self._lock = threading.Lock()

    def agree(self, client_id: int, checkpoints: Sequence[int]) -> int | None:
        """Wait for every client's checkpoint rounds; the newest round all parties share (loaded here)."""
        with self._lock:
            if self._decided.is_set():
                return self._round  # a client rejoining later continues from the current state
            self._offers[client_id] = sorted({int(r) for r in checkpoints})
            everyone = len(self._offers) == len(self._clients)
        if everyone:
            try:
                own = rounds_in(self._dir, "pt")
                chosen = consistent_round(own, self._offers.values())
                if chosen is not None:
                    self.restore(load_checkpoint(checkpoint_path(self._dir, chosen, "pt"), expect_model=self.model_fingerprint))
                    log.info("resuming from round %d (server has %s, clients %s)", chosen, own, self._offers)
                else:
                    log.info("resume: no checkpoint round common to all parties (server %s, clients %s); starting fresh", own, self._offers)
                self._round = chosen
            except BaseException as exc:
                self._failed = exc
                self._on_error(exc)
                raise
            finally:
                self._decided.set()
        elif not self._decided.wait(timeout=self._cfg.server.startup_timeout_s):
            raise TimeoutError(
                f"client {client_id}: resume waits for every client's checkpoints; only {len(self._offers)} of "
                f"{len(self._clients)} joined within server.startup_timeout_s={self._cfg.server.startup_timeout_s}"
            )
        if self._failed is not None:
            raise RuntimeError(f"the server could not resume: {self._failed}")
        return self._round

    def checkpoint_state(self, rounds: int) -> dict[str, Any]:
        """Everything a restarted server needs to continue exactly: trainable weights, optimizer,
        RNG, counters. Taken under the lock, at a round, when no client's step is in flight."""
        c = self._compute
        with c.lock:
            return {
                "format": 1,
                "rounds": rounds,
                "model": self.model_fingerprint,
                "parameters": {n: p.detach().clone() for n, p in c.named_params},
                "optimizer": copy.deepcopy(c.optimizer.state_dict()) if c.optimizer is not None else None,
                "rng": torch.get_rng_state(),
                "stats": c.stats.counters(),
                "aggregation_rounds": self._get_rounds(),
            }

    def restore(self, state: dict[str, Any]) -> None:
        """Load a :meth:`checkpoint_state` (already checked to fit this model and split)."""
        c = self._compute
        with c.lock:
            named = dict(c.named_params)
            saved = state["parameters"]
            if sorted(saved) != sorted(named):
                raise CheckpointError(
                    f"checkpoint of round {state['rounds']} holds parameters {sorted(saved)[:3]}..., expected {sorted(named)[:3]}..."
                )
            with torch.no_grad():
                for name, value in saved.items():
                    named[name].copy_(value)
            if c.optimizer is not None and state["optimizer"] is not None:
                c.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            c.stats.restore(state["stats"])
            self._set_rounds(int(state["aggregation_rounds"]))
            self._checkpointed.add(int(state["rounds"]))

    def round_done(self, round_index: int) -> None:
        """A FedAvg round is complete (called before any client gets the average): checkpoint if due."""
        every = self._cfg.server.checkpoint_every
        rounds = round_index + 1
        if not every or rounds % every:
            return
        with self._compute.lock:
            if rounds in self._checkpointed:
                return
            self._checkpointed.add(rounds)
            save_atomically(self.checkpoint_state(rounds), checkpoint_path(self._dir, rounds, "pt"))
            prune(self._dir, "pt", self._cfg.server.checkpoint_keep)
        rss, steps = resident_mb(), self._compute.stats.steps
        log.info("checkpoint of round %d written (server steps %d, rss %.1f MB)", rounds, steps, rss)
        self._memory.parent.mkdir(parents=True, exist_ok=True)
        with open(self._memory, "a") as out:  # what the soak benchmark reads: memory over a server process's life
            out.write(json.dumps({"pid": os.getpid(), "round": rounds, "steps": steps, "rss_mb": round(rss, 1)}) + "\n")
