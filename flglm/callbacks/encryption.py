"""Keeps a client's link to the server encrypted for the whole fit."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

log = logging.getLogger("flglm.client")


class EncryptionCallback(Callback):
    """Handshake at fit start, fresh session keys at every epoch, keys forgotten at the end.

    The model code does not change with encryption: ``RemoteMiddle`` and the FedAvg callback
    talk to a ``ServerLink``, and the link seals every message when it holds a session. This
    callback only decides *when* keys are made: a mutually authenticated X25519 handshake
    before the first batch (a wrong server or a client the server does not know fails here),
    a new handshake at each epoch start (fresh ephemeral keys, so a key leaked later does not
    expose earlier epochs), and the session is dropped at teardown. A call made after that
    (a final validation, leaving the federation) runs a new handshake first.

    Args:
        link: the client's ``ServerLink``; it must hold a ``ClientSession``.
        rekey_each_epoch: run a new handshake at the start of every epoch after the first.
    """

    def __init__(self, link: Any, *, rekey_each_epoch: bool = True) -> None:
        if not getattr(link, "encrypted", False):
            raise ValueError("EncryptionCallback needs a ServerLink created with a ClientSession")
        self._link = link
        self._rekey_each_epoch = rekey_each_epoch
        self._epoch_keyed: int | None = None

    @property
    def handshakes(self) -> int:
        return self._link.session.handshakes

    def connect(self) -> None:
        """Run the handshake now unless a session is up (callable before ``fit`` to fail early)."""
        if not self._link.session.connected:
            self._link.handshake()
            log.info("client %d: encrypted session established", self._link.client_id)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.connect()

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self._epoch_keyed is None:
            self._epoch_keyed = epoch  # the session made at setup serves the first epoch
            return
        if self._rekey_each_epoch and epoch != self._epoch_keyed:
            self._link.handshake()
            self._epoch_keyed = epoch
            log.info("client %d: new session keys for epoch %d", self._link.client_id, epoch)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._link.session.close()
