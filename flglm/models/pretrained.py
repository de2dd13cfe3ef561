"""Read one side's own tensors from a Hugging Face checkpoint directory.

Checkpoints ship as one ``model.safetensors`` or as shards listed by
``model.safetensors.index.json`` (its ``weight_map``: tensor name -> shard file). A side of the
split opens only the shards that hold a tensor it owns and reads only those tensors
(``safe_open`` + ``get_tensor`` per name), so a client never reads the middle stack's bytes and
the server never reads the embedding or the LM head. What was opened and read is kept in a
:class:`LoadingReport`, so a run (and a test) can show each side touched only its own.

Tied embeddings: the LM head shares the embedding's matrix, so it is never read on its own
(checkpoints of tied models usually leave ``lm_head.weight`` out). Weights are held in float32
whatever the checkpoint's ``torch_dtype``: bf16/fp16 -> fp32 is exact, and the split's
forward, link and equivalence checks all run in float32 (``trainer.precision`` may autocast).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("flglm")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass
class LoadingReport:
    """What one side opened and read of a checkpoint (for logs and for tests)."""

    path: str
    checkpoint_dtype: str | None
    """The checkpoint's ``torch_dtype``/``dtype`` from config.json (weights are held in float32)."""
    shards_in_checkpoint: list[str] = field(default_factory=list)
    shards_opened: list[str] = field(default_factory=list)
    tensors_read: list[str] = field(default_factory=list)
    tied_to_embedding: list[str] = field(default_factory=list)
    """Parameters not read because they share the embedding's matrix (the tied LM head)."""

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"read {len(self.tensors_read)} tensors from {len(self.shards_opened)} of "
            f"{len(self.shards_in_checkpoint)} shard(s) of {self.path} (checkpoint dtype {self.checkpoint_dtype}, held in float32)"
        )


def weight_map(path: str | Path) -> dict[str, str]:
    """Tensor name -> shard file name of the checkpoint in ``path``.

    Raises:
        FileNotFoundError: neither an index nor a single ``model.safetensors`` is there.
        ValueError: the index is not valid JSON or has no ``weight_map`` (names the file).
    """
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a safetensors index with a 'weight_map' ({type(err).__name__}: {err})") from None
        return {str(name): str(shard) for name, shard in mapping.items()}
    single = path / SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as reader:
            return {name: SINGLE_FILE for name in reader.keys()}  # noqa: SIM118 - safe_open is no dict
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def checkpoint_dtype(path: str | Path) -> str | None:
    """The dtype config.json declares (``torch_dtype``, or ``dtype`` as transformers 5 writes it)."""
    config = json.loads((Path(path) / "config.json").read_text())
    value = config.get("torch_dtype", config.get("dtype"))
    return str(value) if value is not None else None


def tied_names(model: nn.Module) -> set[str]:
    """Parameter names that are the same tensor as an earlier-named one (the tied LM head)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        else:
            seen[id(param)] = name
    return tied


def owned_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """(parameters this side must read, persistent buffers it reads when the checkpoint has them)."""
    tied = tied_names(model)
    params = [name for name, _ in model.named_parameters(remove_duplicate=False) if name not in tied]
    param_set = set(params) | tied
    buffers = [name for name in model.state_dict() if name not in param_set]
    return params, buffers


def checkpoint_name(name: str, mapping: dict[str, str], base_prefix: str) -> str | None:
    """``name`` as the checkpoint spells it: as is, or without the base model's prefix
    (older GPT-2 checkpoints store ``h.0...`` for ``transformer.h.0...``)."""
    if name in mapping:
        return name
    prefix = f"{base_prefix}." if base_prefix else ""
    if prefix and name.startswith(prefix) and name[len(prefix) :] in mapping:
        return name[len(prefix) :]
    return None


def shard_plan(
    mapping: dict[str, str], params: list[str], buffers: list[str], *, base_prefix: str = ""
) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Which shard to open for which tensors: ``{shard: {model name: checkpoint name}}``, and the
    parameters the checkpoint lacks. Pure: testable on an index alone."""
    plan: dict[str, dict[str, str]] = {}
    missing = []
    for name in [*params, *buffers]:
        stored = checkpoint_name(name, mapping, base_prefix)
        if stored is None:
            if name in params:
                missing.append(name)
            continue
        plan.setdefault(mapping[stored], {})[name] = stored
    return dict(sorted(plan.items())), missing


def load_local(model: nn.Module, path: str | Path) -> LoadingReport:
    """Fill ``model`` (one side, already allocated) with its own tensors from the checkpoint in ``path``.

    Raises:
        ValueError: the checkpoint lacks a parameter this side needs, or a tensor has another
            shape than the model's (naming the file and the tensor).
    """
    from safetensors import safe_open

    path = Path(path)
    mapping = weight_map(path)
    params, buffers = owned_names(model)
    plan, missing = shard_plan(mapping, params, buffers, base_prefix=getattr(model, "base_model_prefix", ""))
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensor(s) this side needs, e.g. {missing[:5]}")
    report = LoadingReport(
        path=str(path),
        checkpoint_dtype=checkpoint_dtype(path),
        shards_in_checkpoint=sorted(set(mapping.values())),
        tied_to_embedding=sorted(tied_names(model)),
    )
    targets = model.state_dict(keep_vars=True)
    device = next((t.device for t in targets.values()), torch.device("cpu"))  # safetensors reads each tensor straight onto it
    with torch.no_grad():
        for shard, names in plan.items():
            file = path / shard
            if not file.is_file():
                raise FileNotFoundError(f"{path / INDEX_FILE} lists shard {shard}, which is not in {path}")
            report.shards_opened.append(shard)
            with safe_open(str(file), framework="pt", device=str(device)) as reader:
                for name, stored in names.items():
                    tensor = reader.get_tensor(stored)
                    report.tensors_read.append(stored)
                    if tensor.shape != targets[name].shape:
                        raise ValueError(f"{file}: {stored} has shape {list(tensor.shape)}, model expects {list(targets[name].shape)}")
                    targets[name].copy_(tensor)
    return report


def record_loading(model: nn.Module, path: str | Path) -> LoadingReport | None:
    """Log and write to ``path`` (JSON) what ``model``'s side read of its checkpoint: the
    evidence that each side read only its own. Nothing for a randomly initialised side."""
    from flglm.tensor_files import write_json

    report: LoadingReport | None = getattr(model, "flglm_loading_report", None)
    if report is not None:
        log.info("%s: %s", Path(path).parent.name, report.summary())
        write_json(report.as_dict(), path)
    return report
