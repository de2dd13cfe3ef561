"""Saving and loading weights as safetensors (no pickle), written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def save_tensors(state: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically; an alias of an earlier tensor (tied weights) is
    stored once, under its first name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen: set[tuple] = set()
    unique: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        alias = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if alias in seen and tensor.numel():
            continue
        seen.add(alias)
        unique[key] = tensor.detach().contiguous().cpu()
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(unique, str(tmp))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    return load_file(str(path))


def write_json(data: Any, path: str | Path) -> Path:
    """Write JSON atomically (a reader never sees a half-written summary)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
