"""``SplitClientModule``: the LightningModule users subclass to train a task through the split.

A subclass writes ``training_step``/``validation_step`` against ``self(input_ids, mask)`` as
for any causal LM. This base class makes the split invisible to Lightning:

* the optimizer covers the client blocks; the server steps its own optimizer with the LR
  schedule evaluated at this client's step: within the step's last backward when nothing has
  to come between (``on_before_backward`` arms it; no clipping by global norm, no gradient
  accumulation: two round trips a step), else in a message of its own (``optimizer_step``);
* gradient clipping by global norm spans client *and* server gradients
  (``configure_gradient_clipping``), so it clips exactly as centralized training would;
* with a whole model (``FullCausalLM``) it is a plain LightningModule: the centralized run;
* ``generate`` decodes through the split with key/value caches on both sides
  (:mod:`flglm.client.decoding`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from flglm.client.decoding import generate, left_pad
from flglm.config import GenerationConfig, OptimConfig
from flglm.optim import build_optimizer, build_scheduler, global_clip_coefficient, grad_norms, scale_grads


class SplitClientModule(L.LightningModule):
    """Base class of every task; owns the LM (split or whole) and the optimizer."""

    def __init__(self, lm: nn.Module, *, optim: OptimConfig, generation: GenerationConfig | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.optim_cfg = optim
        self.generation_cfg = generation or GenerationConfig()
        self.loss_history: list[float] = []
        self.samples_seen = 0
        self._total_steps = 1
        self._server_grad_scale = 1.0
        self._server_clip_value: float | None = None
        self._loss_recorded_for: int | None = None

    @property
    def link(self):
        """The server link, or None for a centralized (whole-model) run."""
        return getattr(self.lm, "link", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm(input_ids, attention_mask, position_ids)

    # ---------------------------------------------------------------- generation
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **settings: Any) -> torch.Tensor:
        """Left-padded prompts followed by the generated tokens (see :func:`flglm.client.decoding.generate`).

        ``settings`` override fields of the run's ``generation`` config for this call, e.g.
        ``max_new_tokens=16, do_sample=True``. Decodes in eval mode; the module's mode is restored.
        """
        cfg = dataclasses.replace(self.generation_cfg, **settings)
        config = self.lm.hf_config
        was_training = self.training
        self.eval()
        try:
            return generate(self.lm, input_ids, attention_mask, cfg=cfg, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
        finally:
            self.train(was_training)

    def generate_text(self, prompts: Sequence[str], tokenizer: Any, **settings: Any) -> list[str]:
        """Generate a continuation of each prompt; returns the new text only (special tokens dropped)."""
        return [text for text, _ in self.generate_with_ids(prompts, tokenizer, **settings)]

    def generate_with_ids(
        self, prompts: Sequence[str], tokenizer: Any, *, on_batch: Callable[[int, int], None] | None = None, **settings: Any
    ) -> list[tuple[str, list[int]]]:
        """Each prompt's continuation as (text, generated token ids up to the end-of-text token).

        Prompts are decoded ``generation.batch_size`` at a time (batch ``k`` samples with
        ``seed + k``); ``on_batch(done, total)`` is called after each batch."""
        return self.generate_rows(encode_prompts(prompts, tokenizer), tokenizer, on_batch=on_batch, **settings)

    def generate_rows(
        self, rows: Sequence[list[int]], tokenizer: Any, *, on_batch: Callable[[int, int], None] | None = None, **settings: Any
    ) -> list[tuple[str, list[int]]]:
        """:meth:`generate_with_ids` on prompts already encoded (e.g. in a task's prompt template, as it trained)."""
        empty = [i for i, r in enumerate(rows) if not r]
        if empty:
            raise ValueError(f"every prompt needs at least one token; prompts {empty[:5]} have none")
        cfg = dataclasses.replace(self.generation_cfg, **settings)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        results: list[tuple[str, list[int]]] = []
        for k, start in enumerate(range(0, len(rows), cfg.batch_size)):
            ids, mask = left_pad(list(rows[start : start + cfg.batch_size]), pad)
            results += self.continuations(self.generate(ids, mask, **{**settings, "seed": cfg.seed + k}), ids.shape[1], tokenizer)
            if on_batch is not None:
                on_batch(len(results), len(rows))
        return results

    def continuations(self, sequences: torch.Tensor, prompt_width: int, tokenizer: Any) -> list[tuple[str, list[int]]]:
        """What ``generate`` added after prompts ``prompt_width`` wide: each row's token ids up to
        and including the first end-of-text token, and their text (without it)."""
        eos = self.lm.hf_config.eos_token_id
        results = []
        for row in sequences[:, prompt_width:].tolist():
            if eos in row:
                row = row[: row.index(eos) + 1]
            text_ids = row[:-1] if row and row[-1] == eos else row
            results.append((tokenizer.decode(text_ids, skip_special_tokens=True), row))
        return results

    # ----------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> Any:
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        self._total_steps = max(1, int(total)) if math.isfinite(total) else 1
        # Only what trains: with adapters the frozen base weights get no optimizer state at all.
        optimizer = build_optimizer([p for p in self.lm.parameters() if p.requires_grad], self.optim_cfg)
        scheduler = build_scheduler(optimizer, self.optim_cfg, self._total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if self.link is None or gradient_clip_val is None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm in (None, "norm"):
            norms = grad_norms(self.lm.named_parameters_hf())
            server_norms = self.link.grad_norms()
            norms.update({n: v for n, v in zip(self.lm.server_parameter_names, server_norms) if v >= 0})
            ordered = [norms[n] for n in self.lm.full_parameter_order() if n in norms]
            coefficient = global_clip_coefficient(ordered, float(gradient_clip_val))
            scale_grads(params, coefficient)
            self._server_grad_scale = float(coefficient)
        else:
            torch.nn.utils.clip_grad_value_(params, float(gradient_clip_val))
            self._server_clip_value = float(gradient_clip_val)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Fold the server's optimizer step into this backward when nothing needs the server
        between the two: not clipping by global norm (the server's norms come first) and not
        accumulating gradients (later backwards add to the same step)."""
        if self.link is None or self._trainer is None:
            return
        trainer = self.trainer
        clip, algorithm = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
        if trainer.accumulate_grad_batches != 1 or (clip is not None and algorithm in (None, "norm")):
            return
        self.link.arm_step(
            client_step=trainer.global_step,
            total_steps=self._total_steps,
            clip_value=None if clip is None else float(clip),
        )

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        step_index = self.trainer.global_step
        optimizer.step(closure=optimizer_closure)
        if self.link is not None:
            self.link.step(
                client_step=step_index,
                total_steps=self._total_steps,
                grad_scale=self._server_grad_scale,
                clip_value=self._server_clip_value,
            )
        self._server_grad_scale = 1.0
        self._server_clip_value = None

    # ------------------------------------------------------------------ records
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Counted here, not at batch end: Lightning runs callbacks' batch-end hooks before the
        # module's, and the FedAvg callback weighs its round by the samples trained so far.
        self.samples_seen += _batch_size(batch)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.record_loss(outputs)

    def record_loss(self, outputs: Any) -> None:
        """Append this batch's loss to ``loss_history`` once (a checkpoint taken by a callback,
        whose batch-end hook runs before this module's, records it first)."""
        batch = self.trainer.fit_loop.total_batch_idx if self._trainer is not None else None
        if batch is not None and batch == self._loss_recorded_for:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.loss_history.append(float(loss.detach()))
            self._loss_recorded_for = batch

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["flglm"] = {"loss_history": list(self.loss_history), "samples_seen": self.samples_seen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("flglm", {})
        self.loss_history = list(saved.get("loss_history", []))
        self.samples_seen = int(saved.get("samples_seen", 0))

    def client_state_dict(self) -> dict[str, torch.Tensor]:
        return self.lm.client_state_dict()


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        batch = batch.get("input_ids", next(iter(batch.values())))
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) else len(batch)


def encode_prompts(prompts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Each prompt as the text to continue: BOS (if the tokenizer has one), then its tokens."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + list(ids) for ids in (tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts)]
