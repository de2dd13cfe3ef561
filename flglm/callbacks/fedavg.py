"""FedAvg of the client blocks, at a fixed step interval or at each epoch end."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn.utils import parameters_to_vector
from typing_extensions import override

from flglm.aggregation.masking import NARROW_BITS
from flglm.aggregation.shared import shared_parameters


class FedAvgCallback(Callback):
    """Averages this client's blocks with every other client's through the server.

    Each round sends the flattened trainable client-block parameters and the number of
    samples trained on since the last round (the FedAvg weight); the server answers with the
    weighted average once every active client has contributed, and the client loads it. After
    a round all clients hold identical client blocks (except the ``exclude``d parameters). A
    last round runs at the end of training so the federation ends with one model.

    With a ``masker`` (secure aggregation) the server never sees this client's blocks: the
    round starts by learning who takes part, the upload is masked with pairwise masks that
    cancel in the sum over those participants, and if one of them leaves before uploading
    the server calls the round off and it is redone, with fresh masks, without that client.

    Args:
        link: the client's ``ServerLink``.
        every_n_steps: aggregate after every this many optimizer steps; 0 = at each epoch end.
        masker: this client's ``PairwiseMasker`` for secure aggregation, or None for plain FedAvg.
        checkpoints: a ``flglm.resume.RoundCheckpoints``: the trainer's state is saved right
            after each due round (the server saves its own at the same round).
        exclude: names of parameters that never leave this client (``privacy.private_blocks``):
            they are left out of the averaged vector and keep this client's values. Hugging Face
            names (``model.embed_tokens.weight``, as ``flglm.privacy.private_parameter_names``
            gives them) match the module's names at a dot boundary (``blocks.hf.model.embed_tokens.weight``),
            so they need not know where the model sits in the task module; a name that matches no
            parameter, or several, is an error at the first round.
    """

    def __init__(self, link: Any, *, every_n_steps: int = 0, masker: Any = None, checkpoints: Any = None, exclude: Collection[str] = ()) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        if isinstance(exclude, str):
            raise TypeError(f"exclude must be a collection of parameter names, got the string {exclude!r}")
        self._exclude = frozenset(exclude)
        self._link = link
        self._masker = masker
        self._checkpoints = checkpoints
        self.redone_rounds = 0
        self.narrow_uploads = 0
        """Masked uploads sent 32 bits wide (see ``crypto.narrow_uploads``)."""
        self._every = every_n_steps
        self._round = 0
        self._samples = 0
        self._last_step = -1
        self._seen_before = 0

    @property
    def rounds(self) -> int:
        return self._round

    def _params(self, pl_module: L.LightningModule) -> list[torch.nn.Parameter]:
        return [p for _, p in shared_parameters(pl_module.lm, self._exclude)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self._round,
            "seen_before": self._seen_before,
            "last_step": self._last_step,
            "redone_rounds": self.redone_rounds,
            "narrow_uploads": self.narrow_uploads,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._round = int(state_dict["round"])
        self._seen_before = int(state_dict["seen_before"])
        self._last_step = int(state_dict["last_step"])
        self.redone_rounds = int(state_dict.get("redone_rounds", 0))
        self.narrow_uploads = int(state_dict.get("narrow_uploads", 0))

    def aggregate(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any = None, *, checkpoint: bool = True) -> None:
        params = self._params(pl_module)
        self._samples = pl_module.samples_seen - self._seen_before
        with torch.no_grad():
            # Nothing shared (every trainable parameter private): the round still runs, it is
            # the federation's sync and checkpoint point.
            vector = parameters_to_vector(params).detach().float() if params else torch.zeros(0)
            average = self.average(vector, float(self._samples))
            offset = 0
            for param in params:  # copy in place: parameters keep their own storage
                param.copy_(average[offset : offset + param.numel()].view_as(param))
                offset += param.numel()
        self._round += 1
        self._seen_before = pl_module.samples_seen
        self._last_step = trainer.global_step
        if checkpoint and self._checkpoints is not None and self._checkpoints.due(self._round):
            if outputs is not None:
                pl_module.record_loss(outputs)  # its own batch-end hook runs after this one
            self._checkpoints.save(trainer, self._round)

    def average(self, vector: torch.Tensor, weight: float) -> torch.Tensor:
        """This round's FedAvg of every participating client's ``vector`` (weighted by ``weight``)."""
        if self._masker is None:
            return self._link.aggregate(self._round, vector, weight)
        plan = self._link.aggregation_begin(self._round, self._masker.fits_narrow(vector, weight))
        while True:
            if len(plan.participants) == 1:  # a sum of one reveals nothing the result does not
                upload, upload_weight = vector, weight
            else:
                upload = self._masker.mask(
                    vector, weight, round_index=self._round, attempt=plan.attempt, participants=plan.participants, bits=plan.bits
                )
                upload_weight = 0.0
                if plan.bits == NARROW_BITS:
                    self.narrow_uploads += 1
            average, plan = self._link.aggregation_upload(self._round, plan.attempt, upload, upload_weight)
            if average is not None:
                return average
            self.redone_rounds += 1

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._every and step > 0 and step % self._every == 0 and step != self._last_step:
            self.aggregate(trainer, pl_module, outputs)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._every == 0 and trainer.global_step != self._last_step:
            self.aggregate(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.aggregate(trainer, pl_module, checkpoint=False)  # training is over: nothing to resume
