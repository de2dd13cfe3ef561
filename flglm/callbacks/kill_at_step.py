"""Fault injection for restart tests: a client process that dies in the middle of a step."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

log = logging.getLogger("flglm")


class KillAtStepCallback(Callback):
    """SIGKILLs this process in the middle of optimizer step ``after_steps + 1``.

    It dies after the step's forward and before its backward: the forward has crossed to the
    server, which now holds its autograd state (and, when serving sequentially, the turn) for a
    backward that never comes. That is the state a crashed client leaves behind, and what the
    server must free when it drops the client (``faults.kill_client_at_step``).

    Args:
        after_steps: completed optimizer steps before the kill (>= 1).
    """

    def __init__(self, after_steps: int) -> None:
        if after_steps < 1:
            raise ValueError(f"after_steps must be >= 1, got {after_steps}")
        self._after_steps = after_steps

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Any) -> None:
        if trainer.global_step == self._after_steps:
            log.warning("fault injection: killing this client (SIGKILL) after %d steps, before its backward", self._after_steps)
            logging.shutdown()  # flush the logs: SIGKILL runs no handler
            os.kill(os.getpid(), signal.SIGKILL)
