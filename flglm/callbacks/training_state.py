"""What a Lightning checkpoint leaves out and an exact resume needs: data position and RNG state."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from flglm.data.sampler import ResumableSampler


class TrainingStateCallback(Callback):
    """Saves the position in the epoch's data order and the RNG states; restores both on resume.

    Lightning restores weights, optimizer, scheduler and its loop counters, and resumes at the
    right batch index, but not which batches come next nor the random state (dropout).
    Batches are counted as training sees them (not as the loader prefetches them), and the RNG
    state is set again right before the first resumed batch, after everything at setup that
    draws random numbers.

    Args:
        sampler: the training loader's :class:`ResumableSampler`.
        batch_size: the training loader's batch size.
    """

    def __init__(self, sampler: ResumableSampler, *, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.batches_in_epoch = 0
        self._rng: dict[str, Any] | None = None

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._rng is None:  # not the epoch a resume lands in
            self.batches_in_epoch = 0

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.batches_in_epoch += 1

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.sampler.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning calls this before it builds the data iterator, so the sampler's position holds.
        epoch, done = int(state_dict["epoch"]), int(state_dict["batches_in_epoch"])
        if done >= -(-self.sampler.n // self.batch_size):  # saved at the very end of an epoch
            epoch, done = epoch + 1, 0
        self.sampler.resume_at(epoch, done * self.batch_size)
        self.batches_in_epoch = done
        self._rng = {"torch": state_dict["torch_rng"], "python": state_dict["python_rng"]}

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._rng is None:
            return
        torch.set_rng_state(self._rng["torch"])
        random.setstate(self._rng["python"])

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._rng = None  # the resumed epoch is under way: later epochs start counting from 0
