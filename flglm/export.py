"""Merge a finished run's parts into one Hugging Face model directory.

The client blocks (from one client: after the final FedAvg all clients hold the same ones)
and the server's middle stack are saved under the full model's parameter names, so merging
is a union of two state dicts. A LoRA run saved only the adapters: they are loaded onto the
base model (from ``model.path`` or the seeded init) and folded into its weights. Whoever runs
this holds both parts: in a real federation that is a decision of the parties, not something
the training does by itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, GenerationConfig

from flglm.config import RunConfig, load_config
from flglm.models.lora import merge_lora
from flglm.models.split import build_full_model, saved_state_dict
from flglm.run_layout import client_weights_path, middle_weights_path, tokenizer_dir
from flglm.tensor_files import load_tensors


def export_run(run_dir: str | Path, out_dir: str | Path, *, client: int = 0) -> Path:
    """Write ``out_dir`` (config, safetensors weights in float32, the base model's generation config
    if it had one, tokenizer files) loadable by ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained``."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.peft.method == "ptuning_v2":
        raise ValueError(
            "a P-tuning v2 run's prefixes are not weights of the Hugging Face model, so they cannot be folded "
            "into an exported directory; generate through the split with `flglm generate` instead"
        )
    weights = load_tensors(client_weights_path(run_dir, client))
    middle = load_tensors(middle_weights_path(run_dir))
    overlap = set(weights) & set(middle)
    if overlap:
        raise ValueError(f"client and server parts both hold {sorted(overlap)[:3]}: not parts of one split")
    weights.update(middle)
    model = build_full_model(cfg.model, cfg.peft)
    if cfg.peft.method == "lora":
        # The run saved adapters only: they go onto the base model, then fold into its weights.
        expected_adapters = set(saved_state_dict(model))
        if set(weights) != expected_adapters:
            raise ValueError(
                f"the run's parts hold {len(weights)} tensors, the model's LoRA adapters are {len(expected_adapters)} "
                f"(e.g. missing {sorted(expected_adapters - set(weights))[:3]}, unexpected {sorted(set(weights) - expected_adapters)[:3]})"
            )
        model.load_state_dict(weights, strict=False)
        weights = merge_lora(model).state_dict()
    expected = set(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(weights))
    if missing:
        raise ValueError(f"the run's parts lack {len(missing)} tensor(s) of the model, e.g. {missing[:3]}")
    model.load_state_dict(weights, strict=False)
    # float32, whatever the base checkpoint's dtype: merged LoRA updates are not representable in
    # bf16, and the weights trained and were held in float32 (flglm.models.pretrained).
    model.config.dtype = torch.float32
    model.config.use_cache = True  # the split turned it off; an exported model decodes with a cache
    base = Path(cfg.model.path) if cfg.model.path is not None else None
    if base is not None and (base / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(base, local_files_only=True)
    model.save_pretrained(out_dir)
    tokenizer = _run_tokenizer(cfg, run_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def _run_tokenizer(cfg: RunConfig, run_dir: Path) -> Any:
    """The tokenizer the run used: the base model's own, ``data.tokenizer_path``, or the one it trained (None: none saved)."""
    from flglm.data import load_tokenizer
    from flglm.data.loading import has_tokenizer

    if cfg.model.path is not None and has_tokenizer(cfg.model.path):
        return AutoTokenizer.from_pretrained(cfg.model.path, local_files_only=True)
    if cfg.data.tokenizer_path is not None:
        return load_tokenizer(cfg.data.tokenizer_path)
    return load_tokenizer(tokenizer_dir(run_dir)) if tokenizer_dir(run_dir).is_dir() else None
