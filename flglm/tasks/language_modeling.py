"""Next-token language modeling with loss and perplexity.

``val_loss`` is the mean cross-entropy per predicted token over the whole validation set (each
batch weighted by its tokens, not its rows), and ``val_ppl`` is exp of exactly that number:
perplexity is exp of the token-weighted mean loss, never a mean of per-batch perplexities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from flglm.client.module import SplitClientModule
from flglm.config import GenerationConfig, OptimConfig
from flglm.data.readers import Example


@dataclass
class TextCollator:
    """Tokenizes texts (BOS-prefixed, truncated to ``max_length``) into a right-padded batch.

    Examples that carry ``input_ids`` (token blocks of a plain-text file, all one length) are
    stacked as they are: nothing to pad, every position attended and a target.
    """

    tokenizer: Any
    max_length: int

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        blocks = [e.input_ids for e in examples if e.input_ids is not None]
        if blocks:
            if len(blocks) != len(examples) or len({len(b) for b in blocks}) != 1:
                raise ValueError("a batch mixes token blocks with texts, or blocks of different lengths")
            input_ids = torch.tensor(blocks, dtype=torch.long)
            return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        enc = self.tokenizer(
            [e.text for e in examples],
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


class LanguageModelingTask(SplitClientModule):
    """Causal LM loss on every non-padding next token; validation loss per token and perplexity."""

    def __init__(self, lm: nn.Module, *, optim: OptimConfig, generation: GenerationConfig | None = None) -> None:
        super().__init__(lm, optim=optim, generation=generation)
        self.val_token_loss = MeanMetric()  # weighted by each batch's predicted tokens

    @staticmethod
    def shifted(batch: dict[str, torch.Tensor], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        return logits[:, :-1].float(), targets

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, targets = self.shifted(batch, self(batch["input_ids"], batch["attention_mask"]))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits, targets = self.shifted(batch, self(batch["input_ids"], batch["attention_mask"]))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        tokens = int((targets != -100).sum())
        if tokens:
            self.val_token_loss.update(loss, weight=tokens)

    def on_validation_epoch_end(self) -> None:
        if int(self.val_token_loss.update_count):
            loss = self.val_token_loss.compute()
            self.log("val_loss", loss, prog_bar=True)
            self.log("val_ppl", torch.exp(loss), prog_bar=True)
        self.val_token_loss.reset()
