"""Classification by prompt + verbalizer, as FL-GLM does for SuperGLUE-style tasks.

The text is wrapped in a prompt (``"{text} sentiment :"``) and the LM scores one label word
per class at the prompt's last position; the loss is cross-entropy over those label words'
logits and the prediction is the best-scoring word. A text too long for ``max_length`` is cut
on one side: SuperGLUE texts end with the question and ``answer:``, right where the label word
is scored, so for them the start of the passage goes (``truncation_side="left"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from flglm.client.module import SplitClientModule
from flglm.config import GenerationConfig, OptimConfig
from flglm.data.readers import Example


class PromptError(ValueError):
    """A prompt or label word does not fit the tokenizer or the model."""


@dataclass
class PromptCollator:
    """Tokenizes examples into ``prefix + text + suffix`` with the text truncated to fit.

    ``truncation_side``: ``right`` keeps the start of a long text, ``left`` keeps its end.
    """

    tokenizer: Any
    prompt: str
    label_words: Sequence[str]
    max_length: int
    truncation_side: str = "right"

    def __post_init__(self) -> None:
        if self.truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {self.truncation_side!r}")
        prefix, _, suffix = self.prompt.partition("{text}")
        self._prefix = self._ids(prefix)
        self._suffix = self._ids(suffix)
        self._bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        fixed = len(self._bos) + len(self._prefix) + len(self._suffix)
        if fixed >= self.max_length:
            raise PromptError(f"the prompt alone takes {fixed} tokens, data.max_length={self.max_length} leaves no room for text")
        self._budget = self.max_length - fixed
        self.label_token_ids = []
        for word in self.label_words:
            ids = self._ids(word)
            if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
                raise PromptError(
                    f"label word {word!r} must be exactly one known token, the tokenizer gives {ids}; a byte "
                    "vocabulary (data.tokenizer=bytes) spells words byte by byte: use byte_bpe or word, which "
                    "make the label words single tokens, or a tokenizer built with flglm tokenizer --required WORDS"
                )
            self.label_token_ids.append(ids[0])

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text.strip() else []

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        texts = self.tokenizer([e.text for e in examples], add_special_tokens=False)["input_ids"]
        rows = [self._bos + self._prefix + truncate(ids, self._budget, self.truncation_side) + self._suffix for ids in texts]
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        labels = torch.tensor([e.label if e.label is not None else -1 for e in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def truncate(ids: Sequence[int], budget: int, side: str) -> list[int]:
    """At most ``budget`` of ``ids``: the first ones (``side="right"``) or the last (``"left"``)."""
    ids = list(ids)
    if len(ids) <= budget:
        return ids
    return ids[len(ids) - budget :] if side == "left" else ids[:budget]


class ClassificationTask(SplitClientModule):
    """Prompt + verbalizer classification with accuracy and macro-F1 (torchmetrics)."""

    def __init__(
        self,
        lm: nn.Module,
        *,
        optim: OptimConfig,
        label_token_ids: Sequence[int],
        generation: GenerationConfig | None = None,
    ) -> None:
        super().__init__(lm, optim=optim, generation=generation)
        self.register_buffer("label_token_ids", torch.tensor(list(label_token_ids), dtype=torch.long), persistent=False)
        num_classes = len(label_token_ids)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_f1 = MulticlassF1Score(num_classes=num_classes, average="macro")

    def class_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        last = batch["attention_mask"].sum(dim=1) - 1
        at_last = logits[torch.arange(logits.shape[0], device=logits.device), last]
        return at_last[:, self.label_token_ids].float()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.class_logits(batch), batch["labels"])
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        scores = self.class_logits(batch)
        loss = F.cross_entropy(scores, batch["labels"])
        preds = scores.argmax(dim=-1)
        self.val_acc.update(preds, batch["labels"])
        self.val_f1.update(preds, batch["labels"])
        n = batch["labels"].shape[0]
        self.log("val_loss", loss, prog_bar=True, batch_size=n)
        self.log("val_acc", self.val_acc, prog_bar=True, batch_size=n)
        self.log("val_f1", self.val_f1, batch_size=n)
