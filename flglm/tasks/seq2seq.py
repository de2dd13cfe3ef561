"""Generation (prompt -> target) as a causal LM, e.g. summarization: article -> summary.

Each example is one sequence ``BOS + prompt(source) + target + EOS``. The loss is next-token
cross-entropy on the target and its end-of-text token only: the model learns to write the
summary after the prompt, not to reproduce articles. The source is truncated to the tokens
left by the prompt words and the target budget, so a prompt is the same whether or not its
target is known, and the prompt plus everything generated fits ``max_length``.

At validation the loss covers every dev example; the first ``max_eval_generations`` dev prompts
are also decoded greedily through the split (:meth:`SplitClientModule.generate`, with key/value
caches on both sides) and the text is scored against the reference with torchmetrics:
ROUGE-1/2/L F-measure (averaged over examples) and corpus BLEU, on the tokens that
``task.metric_tokenizer`` chooses (:mod:`flglm.tasks.text_metrics`: CJK per character by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from flglm.client.decoding import left_pad
from flglm.client.module import SplitClientModule
from flglm.config import GenerationConfig, OptimConfig
from flglm.data.readers import Example
from flglm.tasks.classification import PromptError, truncate
from flglm.tasks.text_metrics import TextOverlapMetrics

ROUGE_KEYS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")
"""Logged as ``val_<key>`` (F-measure). Not ``rougeLsum``: it splits sentences with nltk's punkt
model, which torchmetrics downloads on first use; these three need neither nltk nor a network."""

IGNORE_INDEX = -100


@dataclass
class Seq2SeqCollator:
    """Tokenizes (source, target) examples into one right-padded causal LM batch.

    Each row is ``BOS + prefix + source + suffix + target + EOS`` (``prompt`` is
    ``prefix{text}suffix``); ``labels`` hold the target and EOS ids and -100 on the prompt and
    the padding. The target keeps at most ``max_target_tokens`` tokens (EOS included); the
    source gets what is left of ``max_length``, cut on ``truncation_side`` (``right`` keeps an
    article's lead). The batch also carries the prompts left-padded (``prompt_ids``,
    ``prompt_mask``), ready for :func:`flglm.client.decoding.generate`, and the reference texts.
    """

    tokenizer: Any
    prompt: str
    max_length: int
    max_target_tokens: int
    truncation_side: str = "right"

    def __post_init__(self) -> None:
        if self.truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {self.truncation_side!r}")
        if "{text}" not in self.prompt:
            raise PromptError(f"the prompt must contain '{{text}}', got {self.prompt!r}")
        if self.tokenizer.eos_token_id is None:
            raise PromptError("the tokenizer has no end-of-text token; generation needs one to learn where a target ends")
        if self.max_target_tokens < 1:
            raise PromptError(f"max_target_tokens must be >= 1 (the end-of-text token), got {self.max_target_tokens}")
        prefix, _, suffix = self.prompt.partition("{text}")
        self._prefix = self._ids(prefix)
        self._suffix = self._ids(suffix)
        self._bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        self._eos = int(self.tokenizer.eos_token_id)
        fixed = len(self._bos) + len(self._prefix) + len(self._suffix)
        self.source_budget = self.max_length - fixed - self.max_target_tokens
        if self.source_budget < 1:
            raise PromptError(
                f"the prompt takes {fixed} tokens and task.max_target_tokens={self.max_target_tokens}; "
                f"data.max_length={self.max_length} leaves no room for the source"
            )

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text.strip() else []

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []

    def prompt_rows(self, sources: Sequence[str]) -> list[list[int]]:
        """``BOS + prefix + source + suffix`` of each source, the source cut to its budget."""
        return [
            self._bos + self._prefix + truncate(ids, self.source_budget, self.truncation_side) + self._suffix for ids in self._encode(list(sources))
        ]

    def target_rows(self, targets: Sequence[str]) -> list[list[int]]:
        """Each target's ids, cut to ``max_target_tokens - 1``, then EOS."""
        return [ids[: self.max_target_tokens - 1] + [self._eos] for ids in self._encode(list(targets))]

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        missing = [i for i, e in enumerate(examples) if e.target is None]
        if missing:
            raise ValueError(f"generation needs a target for every example; examples {missing} of the batch have none")
        targets = [e.target for e in examples]
        prompts = self.prompt_rows([e.text for e in examples])
        answers = self.target_rows(targets)  # type: ignore[arg-type]
        pad = self.tokenizer.pad_token_id or 0
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        prompt_ids, prompt_mask = left_pad(prompts, pad)
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            row = prompt + answer
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
            labels[i, len(prompt) : len(row)] = torch.tensor(answer)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "references": targets,
        }


class GenerationTask(SplitClientModule):
    """Prompt -> target training with the loss on the target; ROUGE and BLEU of generated text.

    Metrics (torchmetrics): ``val_loss`` (mean cross-entropy per target token over the dev
    set), ``val_rouge1``/``val_rouge2``/``val_rougeL`` (F-measure, mean over the decoded
    examples; no stemming, which would need nltk) and ``val_bleu`` (corpus BLEU-4), both on the
    tokens of ``metric_tokenizer`` (lower-cased: a word-level tokenizer writes lower-case words,
    which is no error against the raw reference). ``generations`` holds the last validation's
    (generated, reference) texts.
    """

    def __init__(
        self,
        lm: nn.Module,
        *,
        optim: OptimConfig,
        tokenizer: Any,
        generation: GenerationConfig | None = None,
        max_new_tokens: int | None = None,
        max_eval_generations: int = 32,
        metric_tokenizer: str = "auto",
    ) -> None:
        super().__init__(lm, optim=optim, generation=generation)
        if max_eval_generations < 0:
            raise ValueError(f"max_eval_generations must be >= 0, got {max_eval_generations}")
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens if max_new_tokens is not None else self.generation_cfg.max_new_tokens
        self.max_eval_generations = max_eval_generations
        self.val_loss = MeanMetric()
        self._overlap = TextOverlapMetrics(metric_tokenizer, rouge_keys=ROUGE_KEYS, tokenizer=tokenizer)
        # Attributes of the module, so Lightning moves and resets them with it.
        self.val_rouge = self._overlap.rouge
        self.val_bleu = self._overlap.bleu
        self.generations: list[tuple[str, str]] = []

    def target_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Mean next-token cross-entropy over the target tokens, and how many there are."""
        logits = self(batch["input_ids"], batch["attention_mask"])[:, :-1].float()
        targets = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return loss, int((targets != IGNORE_INDEX).sum())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, _ = self.target_loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def generate_from_prompts(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[str]:
        """Greedy continuation of left-padded prompts, as text up to the end-of-text token."""
        out = self.generate(prompt_ids, prompt_mask, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [text for text, _ in self.continuations(out, prompt_ids.shape[1], self.tokenizer)]

    def score_texts(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        """Add generated texts and their references to this validation's ROUGE and BLEU."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        self._overlap.update(predictions, references)
        self.generations.extend(zip(predictions, references))

    def on_validation_epoch_start(self) -> None:
        self.generations = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        n = batch["input_ids"].shape[0]
        loss, tokens = self.target_loss(batch)
        self.val_loss.update(loss, weight=tokens)
        self.log("val_loss", self.val_loss, prog_bar=True, batch_size=n)
        take = min(n, self.max_eval_generations - len(self.generations))
        if take > 0:
            texts = self.generate_from_prompts(batch["prompt_ids"][:take], batch["prompt_mask"][:take])
            self.score_texts(texts, batch["references"][:take])

    def on_validation_epoch_end(self) -> None:
        if self.generations:
            for key, value in self._overlap.compute(ROUGE_KEYS).items():
                self.log(f"val_{key}", value)
        self._overlap.reset()
