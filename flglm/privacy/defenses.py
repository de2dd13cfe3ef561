"""Defenses of a client against a curious server (``privacy`` config section).

The server sees two things of each client's data: the hidden states the input block sends
and the gradient the client returns for the middle stack's output. With the client blocks'
weights (public: every party builds them from the same config) it can invert both into
tokens. Two kinds of defense, each a config switch:

* :class:`PrivacyGuard` blurs what crosses the link: per-token L2 clipping and Gaussian noise
  on the hidden states (forward) and on the returned gradient (backward). The noise comes from
  a generator the guard owns, seeded from a secret unless a test asks for a fixed seed: the
  server knows the config and could otherwise regenerate the noise and subtract it.
* Private blocks (:func:`private_parameter_names`) are left out of FedAvg, so their weights
  never leave the client; :func:`apply_secret_init` first re-draws them secretly, so the
  server does not know even their starting point.
"""

from __future__ import annotations

import logging
import secrets
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flglm.config import PRIVATE_BLOCKS, PrivacyConfig
from flglm.models.lora import LORA_MARK
from flglm.models.split import ClientBlocks, redraw

log = logging.getLogger("flglm.privacy")

# torch's CPU generator is an MT19937 whose manual_seed keeps only 32 bits of the seed, few
# enough for a server to try them all. A secret generator fills the whole MT19937 state (624
# words, as uint64 slots after a 24-byte header) from ``secrets`` instead.
_STATE_BYTES = 5056
_MT_WORDS = 624
_MT_OFFSET = 24


def secret_generator() -> torch.Generator:
    """A CPU generator whose entire MT19937 state (19,937 bits) is drawn from ``secrets``."""
    gen = torch.Generator().manual_seed(secrets.randbits(64))
    state = gen.get_state()
    if state.numel() != _STATE_BYTES or sys.byteorder != "little":
        log.warning("unknown torch generator state layout: the secret noise seed has only 32 bits of entropy")
        return gen
    words = np.frombuffer(secrets.token_bytes(4 * _MT_WORDS), dtype=np.uint32).astype(np.uint64)
    state[_MT_OFFSET : _MT_OFFSET + 8 * _MT_WORDS] = torch.from_numpy(words.view(np.uint8).copy())
    gen.set_state(state)
    if not torch.equal(gen.get_state(), state):
        raise RuntimeError("torch did not accept the secret generator state")
    return gen


def _clip(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Each vector along the last dimension scaled down to L2 norm ``bound`` if longer (differentiable)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * (bound / norm.clamp_min(1e-12)).clamp(max=1.0)


def _noise(x: torch.Tensor, multiplier: float, bound: float, generator: torch.Generator) -> torch.Tensor:
    """Per-token N(0, (multiplier * s)^2 / H) with s = ``bound``, or each vector's own norm when 0."""
    scale = bound if bound > 0 else torch.linalg.vector_norm(x.detach().float(), dim=-1, keepdim=True).cpu()
    std = multiplier * scale / x.shape[-1] ** 0.5
    draw = torch.randn(x.shape, generator=generator, dtype=torch.float32) * std
    return draw.to(device=x.device, dtype=x.dtype)


class _GuardGradient(torch.autograd.Function):
    """Identity forward; backward clips and noises the incoming gradient per token vector."""

    @staticmethod
    def forward(ctx, x, guard):  # type: ignore[override]
        ctx.guard = guard
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        guard: PrivacyGuard = ctx.guard
        if guard.grad_clip > 0:
            grad = _clip(grad, guard.grad_clip)
        if guard.grad_noise > 0:
            grad = grad + _noise(grad, guard.grad_noise, guard.grad_clip, guard.generator)
        return grad, None


class PrivacyGuard:
    """Clips and noises what one client sends across the link: hidden states and gradients.

    Args:
        hidden_clip, hidden_noise, grad_clip, grad_noise: as in :class:`flglm.config.PrivacyConfig`.
        generator: the noise source, owned by the guard (forward and backward draw from it in
            the order they run).
        hidden_size: if given, every tensor the guard sees must have it as its last dimension
            (the noise's per-coordinate variance divides by the vector's length).
    """

    def __init__(
        self,
        *,
        hidden_clip: float,
        hidden_noise: float,
        grad_clip: float,
        grad_noise: float,
        generator: torch.Generator,
        hidden_size: int | None = None,
    ) -> None:
        for key, value in {"hidden_clip": hidden_clip, "hidden_noise": hidden_noise, "grad_clip": grad_clip, "grad_noise": grad_noise}.items():
            if not value >= 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        self.hidden_clip = float(hidden_clip)
        self.hidden_noise = float(hidden_noise)
        self.grad_clip = float(grad_clip)
        self.grad_noise = float(grad_noise)
        self.generator = generator
        self.hidden_size = hidden_size

    @classmethod
    def from_config(cls, cfg: PrivacyConfig, *, client_index: int, hidden_size: int) -> PrivacyGuard | None:
        """The guard of client ``client_index``; None when no clipping or noise is configured
        (private blocks need no guard: they act on FedAvg, see :func:`private_parameter_names`)."""
        if not (cfg.hidden_clip or cfg.hidden_noise or cfg.grad_clip or cfg.grad_noise):
            return None
        if cfg.noise_seed is None:
            generator = secret_generator()
        else:
            generator = torch.Generator().manual_seed(cfg.noise_seed + client_index)
        return cls(
            hidden_clip=cfg.hidden_clip,
            hidden_noise=cfg.hidden_noise,
            grad_clip=cfg.grad_clip,
            grad_noise=cfg.grad_noise,
            generator=generator,
            hidden_size=hidden_size,
        )

    def _check(self, x: torch.Tensor) -> None:
        if self.hidden_size is not None and x.shape[-1] != self.hidden_size:
            raise ValueError(f"the guard was made for hidden size {self.hidden_size}, got a tensor of shape {list(x.shape)}")

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden states to send: each token vector clipped, then noised.

        The clip is part of the graph (its Jacobian scales the gradient of clipped tokens); the
        noise is additive, so the gradient passes it unchanged."""
        self._check(x)
        if self.hidden_clip > 0:
            x = _clip(x, self.hidden_clip)
        if self.hidden_noise > 0:
            x = x + _noise(x, self.hidden_noise, self.hidden_clip, self.generator)
        return x

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (the middle stack's output) unchanged; its gradient, on the way back to the
        server, is clipped and noised per token vector."""
        self._check(x)
        if not (self.grad_clip or self.grad_noise):
            return x
        return _GuardGradient.apply(x, self)

    def describe(self) -> str:
        """One line for the log: which defenses are on (never the seed)."""
        parts = [
            f"{name} {value:g}"
            for name, value in (
                ("hidden clip", self.hidden_clip),
                ("hidden noise", self.hidden_noise),
                ("grad clip", self.grad_clip),
                ("grad noise", self.grad_noise),
            )
            if value
        ]
        return ", ".join(parts)


def _part_modules(blocks: ClientBlocks, part: str) -> list[nn.Module]:
    adapter, hf, plan = blocks.adapter, blocks.hf, blocks.plan
    layers = adapter.get(hf, adapter.layers)
    if part == "input":
        paths = [adapter.token_embedding, *([adapter.position_embedding] if adapter.position_embedding else [])]
        return [adapter.get(hf, p) for p in paths] + [layers[str(i)] for i in plan.head]
    if part == "output":
        return [layers[str(i)] for i in plan.tail] + [adapter.get(hf, adapter.final_norm), adapter.get(hf, adapter.lm_head)]
    raise ValueError(f"unknown client part {part!r}; expected one of {list(PRIVATE_BLOCKS)}")


def private_parameter_names(blocks: ClientBlocks, parts: Sequence[str]) -> set[str]:
    """The names (as in ``blocks.hf.named_parameters()``) of the parameters of the given parts.

    ``input``: token [+ position] embedding and the head blocks; ``output``: the tail blocks,
    the final norm and the LM head. A tied LM head is the embedding's matrix: it is listed (under
    the embedding's name) if either part is. LoRA adapters inside a part belong to it; the
    P-tuning prefix encoder belongs to neither.
    """
    ids = {id(p) for part in parts for module in _part_modules(blocks, part) for p in module.parameters()}
    return {name for name, p in blocks.hf.named_parameters() if id(p) in ids}


def apply_secret_init(blocks: ClientBlocks, parts: Sequence[str], *, seed: int | None = None) -> None:
    """Re-draw the base weights of the given parts from a secret random state (``seed``: tests only).

    Same distribution as :func:`flglm.models.split.init_random` (norms 1, biases 0, matrices
    N(0, initializer_range)), but the server cannot regenerate it: the weights it would invert
    the hidden states with are unknown to it. Norm weights and biases are constants under that
    distribution and stay public. LoRA adapters keep their own initialisation. On a pretrained
    model this throws the pretrained weights of these parts away.
    """
    names = sorted(n for n in private_parameter_names(blocks, parts) if LORA_MARK not in n)
    if not names:
        raise ValueError(f"the client parts {list(parts)} have no parameters to re-draw")
    generator = secret_generator() if seed is None else torch.Generator().manual_seed(seed)
    redraw(blocks.hf, names, lambda _name: generator)


@dataclass(frozen=True)
class ClientDefenses:
    """What :func:`client_defenses` set up for one client."""

    guard: PrivacyGuard | None
    """For :class:`flglm.client.lm.SplitCausalLM`; None when no clipping or noise is on."""
    private_names: frozenset[str]
    """Hugging Face names of the private parameters, for ``FedAvgCallback(exclude=...)``."""
    summary: str
    """One line for the log: which defenses are on."""


def client_defenses(cfg: PrivacyConfig, blocks: ClientBlocks, *, client_index: int) -> ClientDefenses:
    """Set up client ``client_index``'s defenses: re-draw its private blocks (``secret_init``),
    make its guard, and name the parameters FedAvg must leave out.

    Call it right after the blocks are built and before trained weights are loaded into them."""
    private = frozenset(private_parameter_names(blocks, cfg.private_blocks))
    if cfg.secret_init:
        seed = None if cfg.noise_seed is None else zlib.crc32(f"secret_init:{cfg.noise_seed + client_index}".encode())
        apply_secret_init(blocks, cfg.private_blocks, seed=seed)
    guard = PrivacyGuard.from_config(cfg, client_index=client_index, hidden_size=blocks.hidden_size)
    parts = [guard.describe()] if guard is not None else []
    if cfg.private_blocks:
        what = f"private blocks {list(cfg.private_blocks)} ({len(private)} tensors kept out of FedAvg"
        parts.append(what + (", secretly re-drawn)" if cfg.secret_init else ")"))
    if parts and (guard is not None or cfg.secret_init):
        parts.append("noise seed " + ("secret" if cfg.noise_seed is None else f"{cfg.noise_seed + client_index} (NOT secret: tests only)"))
    summary = "; ".join(parts) if parts else "none"
    return ClientDefenses(guard=guard, private_names=private, summary=summary)
