"""``model.dtype``: the dtype frozen weights are stored in; what trains stays float32.

Rule (kept simple on purpose): a parameter that trains is kept in float32 — LoRA adapters, the
P-tuning prefix encoder, and with ``peft.method=none`` every weight (the float32 master weights
full fine-tuning needs; ``model.dtype`` then changes nothing stored, and that is logged). Only
frozen base weights (LoRA, P-tuning v2) are stored in ``model.dtype``; autocast is unchanged.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import PretrainedConfig

from flglm.config import ConfigError, ModelConfig, PeftConfig

log = logging.getLogger("flglm")

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def requested_dtype(model_cfg: ModelConfig, hf_config: PretrainedConfig) -> torch.dtype:
    """``model.dtype`` as a torch dtype; ``auto``: the checkpoint's ``torch_dtype`` (float32 for random init)."""
    name = model_cfg.dtype
    if name == "auto":
        if model_cfg.path is None:
            return torch.float32
        stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "float32"
        name = str(stored).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={model_cfg.dtype!r} resolves to {name!r}, not one of {sorted(DTYPES)}")
    return DTYPES[name]


def frozen_weight_dtype(model_cfg: ModelConfig, hf_config: PretrainedConfig, peft_cfg: PeftConfig | None) -> torch.dtype:
    """The dtype a side's base weights are allocated in: ``model.dtype`` when they are frozen, else float32."""
    dtype = requested_dtype(model_cfg, hf_config)
    trains_base = peft_cfg is None or peft_cfg.method == "none"
    if trains_base and dtype != torch.float32:
        log.info("model.dtype=%s: peft.method=none trains every weight, so weights stay float32 (master weights)", model_cfg.dtype)
        return torch.float32
    return dtype


def keep_trainable_float32(model: nn.Module) -> None:
    """Cast every parameter that trains to float32 (peft gives new adapters the base layer's dtype)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
