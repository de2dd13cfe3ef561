"""Checkpoints for resuming a federation: where they are, which one all parties share, safe writes.

A federation is in a consistent state only where every party is at the same point: at the end
of a FedAvg round every client waits for the average and the server has applied every step
before it. So checkpoints are taken at rounds and named by the number of rounds completed;
each party keeps its own (``run_dir/checkpoints/server``, ``.../client{i}``), and a restarted
federation resumes from the newest round that *every* party has: the server learns each
client's rounds at the handshake and answers every client with the round to load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from flglm.config import RunConfig, to_dict

_NAME = re.compile(r"^round-(\d{6,})\.(pt|ckpt)$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run (another model or split, or unreadable)."""


def checkpoint_path(directory: str | Path, rounds: int, suffix: str) -> Path:
    return Path(directory) / f"round-{rounds:06d}.{suffix}"


def rounds_in(directory: str | Path, suffix: str) -> list[int]:
    """The rounds of the complete checkpoints in ``directory`` (ascending); half-written ones end in ``.tmp``."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = (_NAME.match(p.name) for p in directory.iterdir())
    return sorted(int(m.group(1)) for m in found if m is not None and m.group(2) == suffix)


def consistent_round(own: Iterable[int], others: Iterable[Iterable[int]]) -> int | None:
    """The newest round every party has a checkpoint of, or None."""
    common = set(own)
    for rounds in others:
        common &= set(rounds)
    return max(common) if common else None


def prune(directory: str | Path, suffix: str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (older rounds are never needed again once
    every party holds a newer one, and each party keeps ``keep >= 2``)."""
    for rounds in rounds_in(directory, suffix)[:-keep]:
        checkpoint_path(directory, rounds, suffix).unlink(missing_ok=True)


def model_fingerprint(cfg: RunConfig, parameter_shapes: dict[str, list[int]]) -> str:
    """What a checkpoint's weights fit: the model, the split, the adapters and the trained tensors."""
    shared = to_dict(cfg)
    blob = json.dumps(
        {"model": shared["model"], "split": shared["split"], "peft": shared["peft"], "parameters": parameter_shapes},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def save_atomically(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file, fsync, rename: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)
    return path


def load_checkpoint(path: str | Path, *, expect_model: str) -> dict[str, Any]:
    """A server checkpoint this process wrote (tensors and plain values only: ``weights_only``)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != 1:
        raise CheckpointError(f"{path}: not a flglm server checkpoint (format 1)")
    if state.get("model") != expect_model:
        raise CheckpointError(
            f"{path}: made for a different model or split (fingerprint {str(state.get('model'))[:12]} != {expect_model[:12]}); "
            "resume with the config it was made with, or start a new run_dir"
        )
    return state


class RoundCheckpoints:
    """A client's side of round checkpoints: its trainer's full state (weights, optimizer,
    scheduler, loop progress, callbacks) at every ``every``-th round, written atomically."""

    def __init__(self, directory: str | Path, *, every: int, keep: int) -> None:
        self.directory = Path(directory)
        self.every = every
        self.keep = keep

    def due(self, rounds: int) -> bool:
        return self.every > 0 and rounds % self.every == 0

    def rounds(self) -> list[int]:
        return rounds_in(self.directory, "ckpt")

    def path(self, rounds: int) -> Path:
        return checkpoint_path(self.directory, rounds, "ckpt")

    def save(self, trainer: Any, rounds: int) -> Path:
        path = self.path(rounds)
        tmp = path.with_name(path.name + ".tmp")
        self.directory.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        prune(self.directory, "ckpt", self.keep)
        return path
