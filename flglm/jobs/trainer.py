"""The Lightning side of one process: a single-process Trainer (whatever torchrun says) and the run's logging."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero
from lightning_fabric.utilities import rank_zero as fabric_rank_zero

from flglm.config import RunConfig
from flglm.devices import lightning_accelerator


class StandaloneEnvironment(LightningEnvironment):
    """Each client's Trainer is a single-process job, even though torchrun started it.

    torchrun's RANK/WORLD_SIZE describe the federation, not a data-parallel job; this
    environment keeps Lightning from reading them.
    """

    @staticmethod
    def detect() -> bool:
        return False

    @property
    def creates_processes_externally(self) -> bool:
        return False

    def world_size(self) -> int:
        return 1

    def global_rank(self) -> int:
        return 0

    def local_rank(self) -> int:
        return 0

    def node_rank(self) -> int:
        return 0


def _loggers(out_dir: Path) -> list[Logger]:
    """CSV always; TensorBoard too when it is installed."""
    loggers: list[Logger] = [CSVLogger(str(out_dir), name="logs", version="")]
    if _tensorboard_available():
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(out_dir), name="tensorboard", version=""))
    return loggers


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ModuleNotFoundError:
        try:
            import tensorboardX  # noqa: F401
        except ModuleNotFoundError:
            return False
    return True


def make_trainer(cfg: RunConfig, out_dir: Path, callbacks: list[L.Callback], device: torch.device | None = None) -> L.Trainer:
    """A single-process Trainer on ``device`` configured from ``cfg.trainer``."""
    rank_zero.rank_zero_only.rank = 0  # type: ignore[attr-defined]
    fabric_rank_zero.rank_zero_only.rank = 0  # type: ignore[attr-defined]
    t = cfg.trainer
    return L.Trainer(
        **lightning_accelerator(device or torch.device("cpu")),
        num_nodes=1,
        plugins=[StandaloneEnvironment()],
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        gradient_clip_algorithm=t.gradient_clip_algorithm if t.gradient_clip_val is not None else None,
        precision=t.precision,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.enable_progress_bar,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=t.num_sanity_val_steps,
        limit_val_batches=t.limit_val_batches,
        logger=_loggers(out_dir),
        callbacks=callbacks,
        default_root_dir=str(out_dir),
    )
