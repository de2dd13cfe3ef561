"""Optimizer and learning-rate schedule, shared by clients, the server and centralized runs.

The server's schedule is evaluated at the *client's* step index, so a server that serves N
clients sequentially follows each client's schedule instead of running it N times faster.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from flglm.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name={cfg.name!r} is not one of ['adamw', 'sgd']")


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based) of ``total_steps``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.scheduler == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    if cfg.scheduler == "linear":
        return 1.0 - progress
    if cfg.scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.scheduler={cfg.scheduler!r} is not one of ['constant', 'linear', 'cosine']")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


def set_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Set every group's learning rate for ``step``; returns it."""
    lr = cfg.lr * lr_factor(step, total_steps, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def grad_norms(named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Per-parameter L2 norms of the gradients, as ``torch.nn.utils.clip_grad_norm_`` takes them.

    One side's piece of a global norm: the client merges both sides' norms in the full model's
    parameter order, so the total (and the clipping) is bit-identical to centralized clipping.
    """
    return {name: torch.linalg.vector_norm(p.grad.detach(), 2.0) for name, p in named_params if p.grad is not None}


def global_clip_coefficient(norms: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_``'s coefficient: min(1, max_norm / (||norms|| + 1e-6)), in float32."""
    if not norms:
        return torch.ones(())
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def scale_grads(params: Iterable[torch.nn.Parameter], factor: float | torch.Tensor) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)
