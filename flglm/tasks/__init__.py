"""Built-in tasks (subclasses of SplitClientModule) and the factory that picks one from config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from flglm.client.module import SplitClientModule
from flglm.config import RunConfig
from flglm.tasks.classification import ClassificationTask, PromptCollator, PromptError
from flglm.tasks.language_modeling import LanguageModelingTask, TextCollator

__all__ = [
    "ClassificationTask",
    "LanguageModelingTask",
    "PromptCollator",
    "PromptError",
    "TextCollator",
    "build_task",
]


def build_task(cfg: RunConfig, lm: nn.Module, tokenizer: Any) -> tuple[SplitClientModule, Callable]:
    """The task module for ``cfg.task.kind`` and the collate function that feeds it."""
    if cfg.task.kind == "classification":
        collate = PromptCollator(tokenizer, cfg.task.prompt, cfg.task.label_words, cfg.data.max_length)
        return ClassificationTask(lm, optim=cfg.optim, label_token_ids=collate.label_token_ids), collate
    if cfg.task.kind == "language_modeling":
        return LanguageModelingTask(lm, optim=cfg.optim), TextCollator(tokenizer, cfg.data.max_length)
    raise ValueError(f"task.kind={cfg.task.kind!r} is not one of ['classification', 'language_modeling']")
