"""Text generation through the split: greedy or sampled decoding with key/value caches.

``generate`` drives any model that decodes incrementally (``open_decoding``, ``decode``,
``close_decoding``): the split model (:class:`flglm.client.lm.SplitCausalLM`, the client's
blocks cache here, the middle stack's on the server) or the whole model (the centralized
reference). The first call runs the prompt; each further call runs one new token, so the
link carries one hidden state per row and step.

Greedy decoding picks what Hugging Face's ``generate`` picks on the same weights: the same
position ids for left-padded prompts (``cumsum(mask) - 1``), the same stop at an end-of-text
token, the same padding of finished rows. Sampling shapes the scores with the Transformers
logits warpers (temperature, top-k, top-p) and draws from a seeded generator of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from flglm.config import GenerationConfig


class GenerationError(ValueError):
    """The prompts or settings cannot be decoded (padding side, shapes, length limit)."""


class IncrementalDecoder(Protocol):
    max_positions: int | None

    def open_decoding(self) -> Any: ...

    def decode(self, state: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor: ...

    def close_decoding(self, state: Any) -> None: ...


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one left-padded batch ``(input_ids, attention_mask)``, as ``generate`` wants."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.int64)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.int64)
    return ids, mask


def logits_warpers(cfg: GenerationConfig) -> LogitsProcessorList:
    """The score transforms of sampling, in Hugging Face's order: temperature, top-k, top-p."""
    warpers = LogitsProcessorList()
    if cfg.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k > 0:
        warpers.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        warpers.append(TopPLogitsWarper(cfg.top_p))
    return warpers


def _check_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if input_ids.dim() != 2 or input_ids.dtype != torch.int64 or input_ids.shape[1] == 0:
        raise GenerationError(f"input_ids must be int64 of shape [batch, length >= 1], got {input_ids.dtype} {list(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise GenerationError(f"attention_mask has shape {list(attention_mask.shape)}, input_ids {list(input_ids.shape)}")
    if not bool((attention_mask[:, -1] == 1).all()):
        raise GenerationError("prompts must be left-padded: every row's last position must be a real token (attention_mask 1)")
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise GenerationError("prompts must be left-padded: padding (attention_mask 0) only before a row's first token")


@torch.no_grad()
def generate(
    lm: IncrementalDecoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    cfg: GenerationConfig,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Prompts followed by up to ``cfg.max_new_tokens`` generated tokens, ``[batch, length + new]``.

    Prompts of different lengths are left-padded (``attention_mask`` 0 on the padding). A row
    that produced an ``eos_token_id`` is finished: its later positions hold ``pad_token_id``;
    decoding stops when every row is finished.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _check_prompts(input_ids, attention_mask)
    limit = lm.max_positions
    if limit is not None and input_ids.shape[1] + cfg.max_new_tokens > limit:
        raise GenerationError(
            f"prompt length {input_ids.shape[1]} + generation.max_new_tokens={cfg.max_new_tokens} exceeds the model's {limit} positions"
        )
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if eos and pad_token_id is None:
        pad_token_id = eos[0]
    eos_ids = torch.tensor(eos, dtype=torch.int64)
    warpers = logits_warpers(cfg) if cfg.do_sample else None
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.do_sample else None

    mask = attention_mask.to(torch.int64)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    sequences = input_ids
    step_ids, step_positions = input_ids, positions
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool)
    state = lm.open_decoding()
    try:
        for _ in range(cfg.max_new_tokens):
            # chosen on the CPU whatever the client's device: the same tokens, and one generator
            scores = lm.decode(state, step_ids, mask, step_positions)[:, -1, :].float().cpu()
            if warpers is not None:
                probs = torch.softmax(warpers(sequences, scores), dim=-1)
                next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                next_ids = scores.argmax(dim=-1)
            if eos:
                next_ids = torch.where(unfinished, next_ids, torch.full_like(next_ids, pad_token_id))
            sequences = torch.cat([sequences, next_ids[:, None]], dim=1)
            if eos:
                unfinished &= ~torch.isin(next_ids, eos_ids)
                if not bool(unfinished.any()):
                    break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            step_ids, step_positions = next_ids[:, None], step_positions[:, -1:] + 1
    finally:
        lm.close_decoding(state)
    return sequences
