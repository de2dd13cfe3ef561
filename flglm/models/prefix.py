"""P-tuning v2 across the split (``peft.method=ptuning_v2``), as FL-GLM does it.

A prefix encoder on the client (peft's ``PrefixEncoder``) produces ``prefix_length`` learned
key/value pairs for every transformer block. The client's blocks attend to theirs locally;
those of the server's blocks cross the link with the hidden states (sealed like every other
tensor), and the server puts them in front of its blocks' keys and values. All base weights
are frozen on both sides: the prefix encoder, on the client, is all that trains, and the
gradient of the server's prefixes comes back with the gradient of the hidden states.

The prefixes go in through the model's own key/value cache: a ``DynamicCache`` filled with
each block's prefix before the tokens run, exactly as peft feeds prefixes to a whole model.
Token positions are unchanged (0..T-1); the attention mask gains ``prefix_length`` leading
ones.

Tensor layout of a prefix (one per side): ``[layers, 2 (key, value), kv_heads, prefix_length,
head_dim]``, shared by every row of a batch.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig

from flglm.config import PeftConfig

PREFIX_MODULE = "prefix_encoder"
"""Name of the prefix encoder inside the client's (and the centralized) Hugging Face model."""


def kv_shape(config: PretrainedConfig) -> tuple[int, int]:
    """(key/value heads, head dim) of the model's attention."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return kv_heads, head_dim


class PrefixKV(nn.Module):
    """peft's prefix encoder, shaped into per-block key/value prefixes."""

    def __init__(self, config: PretrainedConfig, cfg: PeftConfig, *, seed: int) -> None:
        super().__init__()
        from peft import PrefixTuningConfig
        from peft.tuners.prefix_tuning.model import PrefixEncoder

        self.num_layers = int(config.num_hidden_layers)
        self.kv_heads, self.head_dim = kv_shape(config)
        self.prefix_length = cfg.prefix_length
        encoder_config = PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=cfg.prefix_length,
            token_dim=self.kv_heads * self.head_dim,
            num_layers=self.num_layers,
            num_attention_heads=self.kv_heads,
            encoder_hidden_size=cfg.prefix_hidden_size,
            prefix_projection=cfg.prefix_projection,
        )
        # Built under a fixed seed: every client and the centralized copy start from the same prefix.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = PrefixEncoder(encoder_config)
        self.register_buffer("positions", torch.arange(cfg.prefix_length).unsqueeze(0), persistent=False)

    def forward(self) -> torch.Tensor:
        """Every block's prefix: ``[layers, 2, kv_heads, prefix_length, head_dim]``."""
        out = self.encoder(self.positions)[0]  # [prefix_length, layers * 2 * kv_heads * head_dim]
        out = out.view(self.prefix_length, self.num_layers, 2, self.kv_heads, self.head_dim)
        return out.permute(1, 2, 3, 0, 4)


def prefix_of(model: nn.Module) -> PrefixKV | None:
    return getattr(model, PREFIX_MODULE, None)


def prefix_length_of(model: nn.Module) -> int:
    """Positions the model's prefixes take in front of the tokens (0 without P-tuning)."""
    prefix = prefix_of(model)
    return prefix.prefix_length if prefix is not None else 0


def prefilled_cache(config: PretrainedConfig, prefixes: torch.Tensor, layer_ids: list[int], batch: int) -> DynamicCache:
    """A cache holding ``prefixes[j]`` as the past keys/values of block ``layer_ids[j]`` for each of ``batch`` rows."""
    return prefilled_rows_cache(config, prefixes.unsqueeze(0).expand(batch, *prefixes.shape), layer_ids)


def prefilled_rows_cache(config: PretrainedConfig, row_prefixes: torch.Tensor, layer_ids: list[int]) -> DynamicCache:
    """A cache holding ``row_prefixes[r, j]`` as row ``r``'s past keys/values of block ``layer_ids[j]``
    (``row_prefixes``: ``[rows, layers, 2, kv_heads, prefix_length, head_dim]``)."""
    cache = DynamicCache(config=config)
    for j, layer in enumerate(layer_ids):
        cache.update(row_prefixes[:, j, 0], row_prefixes[:, j, 1], layer)
    return cache


def with_prefix_mask(attention_mask: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """The attention mask with ``prefix_length`` leading ones: every token sees the prefix
    (the mask itself when there is no prefix)."""
    if prefix_length == 0:
        return attention_mask
    ones = attention_mask.new_ones(attention_mask.shape[0], prefix_length)
    return torch.cat([ones, attention_mask], dim=1)
