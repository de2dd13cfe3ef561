"""LoRA on every side of the split, through the ``peft`` library (``peft.method=lora``).

The adapters are injected into the side's own modules after its base weights are in place
(``peft.inject_adapter_in_model``), so the Hugging Face names stay those of the whole model
with LoRA injected: the client, the server and a centralized copy agree on every name. Base
weights are frozen everywhere; only the adapters are optimised, averaged and saved.

LoRA's A matrices are drawn here, one seeded stream per parameter name (peft would draw them
from the global RNG, in an order that depends on which modules a side holds), with peft's
default distribution (Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)));
B starts at zero, so training starts from the base model's outputs exactly.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from flglm.config import PeftConfig

LORA_MARK = ".lora_"
"""Every LoRA parameter's name contains this (``...q_proj.lora_A.default.weight``)."""


def lora_config(cfg: PeftConfig):  # -> peft.LoraConfig
    from peft import LoraConfig

    targets = cfg.target_modules[0] if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, bias="none")


def inject_lora(model: nn.Module, cfg: PeftConfig, *, seed: int) -> nn.Module:
    """Add LoRA adapters to ``model`` in place, freeze everything else, draw A deterministically."""
    model = _inject(model, cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.requires_grad_(LORA_MARK in name)
            if LORA_MARK in name:  # adapters train in float32 whatever model.dtype (peft gives them the base's dtype)
                param.data = param.data.float()
            if ".lora_A." in name:
                bound = 1.0 / math.sqrt(param.shape[1])
                gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
                param.copy_((torch.rand(param.shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound)
            elif ".lora_B." in name:
                param.zero_()
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"peft.target_modules={cfg.target_modules} matched no module of this side of the split")
    return model


def injected_names(model: nn.Module, cfg: PeftConfig) -> list[str]:
    """Parameter names of ``model`` (a meta-device skeleton) once LoRA is injected, in order."""
    return [name for name, _ in _inject(model, cfg).named_parameters()]


def _inject(model: nn.Module, cfg: PeftConfig) -> nn.Module:
    from peft import inject_adapter_in_model

    config = getattr(model, "config", None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # The server's part has neither embedding nor head, so nothing of it is tied; peft would
    # look for the (absent) input embedding of a tied model and fail.
    untie = tied and model.get_input_embeddings() is None
    if untie:
        config.tie_word_embeddings = False
    try:
        return inject_adapter_in_model(lora_config(cfg), model)
    finally:
        if untie:
            config.tie_word_embeddings = True


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters that train (the adapters, with LoRA): what a run saves."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (peft's ``merge``) and drop the LoRA wrappers, so the
    model is a plain Hugging Face model again (what ``flglm export`` writes)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in wrapped:
        module.merge()
        parent_path, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, module.get_base_layer())
    model.flglm_adapters_only = False
    return model
