"""Built-in tasks (subclasses of SplitClientModule) and the factory that picks one from config."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from flglm.client.module import SplitClientModule, encode_prompts
from flglm.config import RunConfig
from flglm.data.chat import chat_prompt
from flglm.data.loading import task_label_words, task_prompt, truncation_side
from flglm.tasks.classification import ClassificationTask, PromptCollator, PromptError
from flglm.tasks.language_modeling import LanguageModelingTask, TextCollator
from flglm.tasks.seq2seq import GenerationTask, Seq2SeqCollator

__all__ = [
    "ClassificationTask",
    "GenerationTask",
    "LanguageModelingTask",
    "PromptCollator",
    "PromptError",
    "Seq2SeqCollator",
    "TextCollator",
    "build_task",
    "prompt_rows",
]


def build_task(cfg: RunConfig, lm: nn.Module, tokenizer: Any) -> tuple[SplitClientModule, Callable]:
    """The task module for ``cfg.task.kind`` and the collate function that feeds it.

    Every task gets the run's ``generation`` settings, so ``generate()`` on any of them decodes
    as configured; with ``task.chat_template`` the prompt is wrapped in the tokenizer's chat template.
    """
    if cfg.task.factory is not None:
        return _own_task(cfg.task.factory)(cfg, lm, tokenizer)
    kind = cfg.task.kind
    prompt = _templated_prompt(cfg, tokenizer)
    if kind == "classification":
        collate = PromptCollator(tokenizer, prompt, task_label_words(cfg), cfg.data.max_length, truncation_side(cfg))
        task = ClassificationTask(lm, optim=cfg.optim, generation=cfg.generation, label_token_ids=collate.label_token_ids)
        return task, collate
    if kind == "generation":
        seq2seq = _seq2seq_collator(cfg, tokenizer)
        # Validation never generates past the target budget: prompt + output then fit data.max_length,
        # which check_fits_model holds to the model's positions.
        generation = GenerationTask(
            lm,
            optim=cfg.optim,
            generation=cfg.generation,
            tokenizer=tokenizer,
            max_new_tokens=min(cfg.generation.max_new_tokens, cfg.task.max_target_tokens),
            max_eval_generations=cfg.task.max_eval_generations,
            metric_tokenizer=cfg.task.metric_tokenizer,
        )
        return generation, seq2seq
    if kind == "language_modeling":
        return LanguageModelingTask(lm, optim=cfg.optim, generation=cfg.generation), TextCollator(tokenizer, cfg.data.max_length)
    raise ValueError(f"task.kind={kind!r} is not one of ['classification', 'generation', 'language_modeling']")


def _own_task(factory: str) -> Callable[[RunConfig, nn.Module, Any], tuple[SplitClientModule, Callable]]:
    """Import ``package.module:function`` (``task.factory``), naming what is missing if it fails."""
    module_name, _, function = factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"task.factory={factory!r}: cannot import {module_name!r} ({err}); is it on PYTHONPATH?") from None
    built = getattr(module, function, None)
    if built is None:
        raise ValueError(f"task.factory={factory!r}: {module_name} has no function {function!r}")
    if not callable(built):
        raise TypeError(f"task.factory={factory!r}: {module_name}.{function} is not a function")
    return built


def _templated_prompt(cfg: RunConfig, tokenizer: Any) -> str:
    """The task's prompt template (``{text}`` in it), inside the chat template if ``task.chat_template``."""
    use_chat = cfg.task.chat_template and cfg.task.kind != "language_modeling"
    return chat_prompt(tokenizer, task_prompt(cfg)) if use_chat else task_prompt(cfg)


def _seq2seq_collator(cfg: RunConfig, tokenizer: Any) -> Seq2SeqCollator:
    return Seq2SeqCollator(tokenizer, _templated_prompt(cfg, tokenizer), cfg.data.max_length, cfg.task.max_target_tokens, truncation_side(cfg))


def prompt_rows(cfg: RunConfig, tokenizer: Any, prompts: Sequence[str], *, raw: bool = False) -> list[list[int]]:
    """Token ids of each prompt as ``flglm generate`` feeds it to the model.

    A generation task's prompt is a source (a question, an article): it is put in the task's prompt
    template exactly as training and validation put it (``BOS + prefix + source + suffix``, the
    source cut to its budget). Otherwise, or with ``raw``, the prompt is the text to continue: BOS
    and its tokens, inside the chat template if ``task.chat_template``."""
    if cfg.task.kind == "generation" and cfg.task.factory is None and not raw:
        return _seq2seq_collator(cfg, tokenizer).prompt_rows(prompts)
    return encode_prompts([chat_prompt(tokenizer, p) for p in prompts] if cfg.task.chat_template else prompts, tokenizer)
