"""Where each supported architecture keeps its pieces.

Splitting a causal LM needs to know five things about it: where the token (and position)
embeddings live, where the list of transformer blocks lives, the final norm, the LM head,
and how one block is called (rotary position embeddings or learned ones). An adapter records
exactly that, so adding an architecture is one small entry in ``ADAPTERS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model class has no adapter."""


def _get(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for name in dotted.split("."):
        module = getattr(module, name)
    return module


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module paths (attribute names in the Hugging Face model) of one architecture family."""

    token_embedding: str
    layers: str
    final_norm: str
    lm_head: str = "lm_head"
    position_embedding: str | None = None
    """Learned absolute position embedding (GPT-2); ``None`` for rotary models."""
    rotary: str | None = None
    """The model-level rotary embedding module that turns position ids into (cos, sin)."""
    embedding_dropout: str | None = None

    def client_module_paths(self) -> list[str]:
        """Modules (besides blocks) that live on the client."""
        paths = [self.token_embedding, self.final_norm, self.lm_head]
        paths += [p for p in (self.position_embedding, self.embedding_dropout) if p]
        return paths

    def get(self, model: nn.Module, path: str) -> nn.Module:
        return _get(model, path)

    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden = _get(model, self.token_embedding)(input_ids)
        if self.position_embedding:
            hidden = hidden + _get(model, self.position_embedding)(position_ids)
        if self.embedding_dropout:
            hidden = _get(model, self.embedding_dropout)(hidden)
        return hidden

    def position_embeddings(
        self, rotary: nn.Module | None, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if rotary is None else rotary(hidden, position_ids=position_ids)

    def call_block(
        self,
        block: nn.Module,
        hidden: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        cache: object | None = None,
    ) -> torch.Tensor:
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids}
        if cache is not None:
            kwargs |= {"cache": cache, "use_cache": True}
        if position_embeddings is not None:
            kwargs["position_embeddings"] = position_embeddings
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out


_LLAMA_LIKE = ArchitectureAdapter(
    token_embedding="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    rotary="model.rotary_emb",
)

_GPT2 = ArchitectureAdapter(
    token_embedding="transformer.wte",
    position_embedding="transformer.wpe",
    embedding_dropout="transformer.drop",
    layers="transformer.h",
    final_norm="transformer.ln_f",
)

ADAPTERS: dict[str, ArchitectureAdapter] = {
    "GlmForCausalLM": _LLAMA_LIKE,
    "Glm4ForCausalLM": _LLAMA_LIKE,
    "LlamaForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "GPT2LMHeadModel": _GPT2,
}


def adapter_for(model_class_name: str) -> ArchitectureAdapter:
    try:
        return ADAPTERS[model_class_name]
    except KeyError:
        raise UnsupportedModelError(f"model class {model_class_name!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}") from None
