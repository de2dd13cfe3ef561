"""Validation of a loaded configuration: the allowed choices and the relations between values that the schema's types cannot express."""

from __future__ import annotations

import math
import re
from dataclasses import fields, is_dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

from flglm.config.schema import PRIVATE_BLOCKS, SUMMARIZATION_FORMATS, SUPERGLUE_FORMATS, PrivacyConfig, RunConfig


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent."""


def _choice_fields(root: type) -> dict[str, tuple[Any, ...]]:
    """``section.field`` -> allowed values, for every section field typed by a ``Literal`` in the schema."""
    choices: dict[str, tuple[Any, ...]] = {}
    for section, section_type in get_type_hints(root).items():
        if not is_dataclass(section_type):
            continue
        hints = get_type_hints(section_type)
        for f in fields(section_type):
            if get_origin(hints[f.name]) is Literal:
                choices[f"{section}.{f.name}"] = get_args(hints[f.name])
    return choices


CHOICES: dict[str, tuple[Any, ...]] = _choice_fields(RunConfig)
"""Every choice field of the config and its allowed values, read from the schema's ``Literal`` annotations."""


def choice_error(key: str, value: object) -> str:
    """The message for a value of choice field ``key`` that is not one of its choices."""
    return f"{key}={value!r} is not one of {list(CHOICES[key])}"


def validate(cfg: RunConfig) -> None:
    """Check the relations between values that the schema's types cannot express."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(choice_error(key, value))
    if (cfg.model.path is None) == (not cfg.model.config):
        raise ConfigError("set exactly one of model.path (a local directory) and model.config (a config dict)")
    if cfg.model.config and "model_type" not in cfg.model.config:
        raise ConfigError("model.config needs a 'model_type' key (e.g. glm, llama, gpt2)")
    positive = {
        "federation.num_clients": cfg.federation.num_clients,
        "data.batch_size": cfg.data.batch_size,
        "data.eval_batch_size": cfg.data.eval_batch_size,
        "data.max_length": cfg.data.max_length,
        "trainer.accumulate_grad_batches": cfg.trainer.accumulate_grad_batches,
        "server.max_pending_per_client": cfg.server.max_pending_per_client,
        "server.max_decode_sessions_per_client": cfg.server.max_decode_sessions_per_client,
        "generation.max_new_tokens": cfg.generation.max_new_tokens,
        "generation.batch_size": cfg.generation.batch_size,
        "server.max_batch_size": cfg.server.max_batch_size,
        "server.max_clients_per_batch": cfg.server.max_clients_per_batch,
        "server.sub_servers": cfg.server.sub_servers,
        "server.sync_every": cfg.server.sync_every,
    }
    if cfg.peft.lora_r < 1:
        raise ConfigError(f"peft.lora_r must be >= 1, got {cfg.peft.lora_r}")
    if not 0 <= cfg.peft.lora_dropout < 1:
        raise ConfigError(f"peft.lora_dropout must be in [0, 1), got {cfg.peft.lora_dropout}")
    if cfg.peft.prefix_length < 1 or cfg.peft.prefix_hidden_size < 1:
        raise ConfigError(f"peft.prefix_length and peft.prefix_hidden_size must be >= 1, got {cfg.peft.prefix_length}, {cfg.peft.prefix_hidden_size}")
    if cfg.server.nonfinite == "skip" and cfg.server.parallelism == "client_batching":
        raise ConfigError(
            "server.nonfinite=skip does not work with server.parallelism=client_batching (one member's NaN would "
            "be skipped for the whole gathered batch); use reject, or sequential, hierarchical or auto serving"
        )
    if not cfg.peft.target_modules:
        raise ConfigError("peft.target_modules must name at least one module (or [all-linear])")
    if not cfg.server.sync_step > 0:
        raise ConfigError(f"server.sync_step must be > 0, got {cfg.server.sync_step}")
    if not cfg.server.sync_timeout_s > 0:
        raise ConfigError(f"server.sync_timeout_s must be > 0, got {cfg.server.sync_timeout_s}")
    g = cfg.generation
    if not (g.temperature > 0 and math.isfinite(g.temperature)):
        raise ConfigError(f"generation.temperature must be finite and > 0, got {g.temperature}")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generation.top_p must be in (0, 1], got {g.top_p}")
    if g.top_k < 0:
        raise ConfigError(f"generation.top_k must be >= 0 (0: no limit), got {g.top_k}")
    if cfg.server.num_threads < 0:
        raise ConfigError(f"server.num_threads must be >= 0, got {cfg.server.num_threads}")
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key, value in {
        "split.client_head_layers": cfg.split.client_head_layers,
        "split.client_tail_layers": cfg.split.client_tail_layers,
        "federation.aggregate_every": cfg.federation.aggregate_every,
        "optim.warmup_steps": cfg.optim.warmup_steps,
    }.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    for key, value in (("server.device", cfg.server.device), ("client.device", cfg.client.device)):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ConfigError(f"{key}={value!r} is not one of auto, cpu, cuda, cuda:N")
    _validate_sub_servers(cfg)
    _validate_link(cfg)
    _validate_checkpoints(cfg)
    _validate_privacy(cfg.privacy)
    if cfg.privacy.secret_init and cfg.peft.method != "none":
        raise ConfigError(
            f"privacy.secret_init needs peft.method=none, got {cfg.peft.method!r}: with frozen base weights the re-drawn "
            "private blocks would never train, and a run saves only the adapters, so the secret weights would be lost"
        )
    if cfg.crypto.client_public_keys and len(cfg.crypto.client_public_keys) != cfg.federation.num_clients:
        raise ConfigError(
            f"crypto.client_public_keys lists {len(cfg.crypto.client_public_keys)} keys for "
            f"federation.num_clients={cfg.federation.num_clients}; give one per client (or none to use crypto.key_dir)"
        )
    if not 1 <= cfg.crypto.rekey_every <= 2**24:
        raise ConfigError(f"crypto.rekey_every must be in [1, {2**24}], got {cfg.crypto.rekey_every}")
    if not (cfg.crypto.max_message_mb > 0 and math.isfinite(cfg.crypto.max_message_mb)):
        raise ConfigError(f"crypto.max_message_mb must be finite and > 0, got {cfg.crypto.max_message_mb}")
    # Written as `not x > 0` so that NaN is rejected too.
    if not (cfg.optim.lr > 0 and math.isfinite(cfg.optim.lr)):
        raise ConfigError(f"optim.lr must be finite and > 0, got {cfg.optim.lr}")
    if not (cfg.data.alpha > 0 and math.isfinite(cfg.data.alpha)):
        raise ConfigError(f"data.alpha must be finite and > 0, got {cfg.data.alpha}")
    if cfg.data.tokenizer == "byte_bpe" and cfg.data.tokenizer_path is None and cfg.data.tokenizer_vocab_size < 260:
        raise ConfigError(
            f"data.tokenizer_vocab_size={cfg.data.tokenizer_vocab_size} is too small for data.tokenizer=byte_bpe: "
            "it must hold the 4 special tokens and the 256 bytes (>= 260)"
        )
    _validate_task(cfg)


def _validate_task(cfg: RunConfig) -> None:
    """The task kind, its prompt and label words, and the data format must fit together."""
    task, data = cfg.task, cfg.data
    if task.factory is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", task.factory):
        raise ConfigError(f"task.factory must look like package.module:function, got {task.factory!r}")
    if task.kind == "classification" and task.label_words is not None and len(task.label_words) < 2:
        raise ConfigError(f"task.label_words needs at least 2 words, got {task.label_words}")
    if task.kind != "language_modeling" and task.prompt is not None and "{text}" not in task.prompt:
        raise ConfigError(f"task.prompt must contain '{{text}}', got {task.prompt!r}")
    if data.format in SUPERGLUE_FORMATS and task.kind != "classification":
        raise ConfigError(f"data.format={data.format} is a classification task; set task.kind=classification, got {task.kind!r}")
    if data.format in SUMMARIZATION_FORMATS and task.kind != "generation":
        raise ConfigError(f"data.format={data.format} gives (article, summary) pairs; set task.kind=generation, got {task.kind!r}")
    _validate_data_fields(cfg)
    if task.kind != "generation":
        return
    if data.format == "text":
        raise ConfigError(
            f"task.kind=generation needs (source, target) pairs: a file with fields (data.prompt_field, data.target_field) "
            f"or data.format in {list(SUMMARIZATION_FORMATS)}, got {data.format!r}"
        )
    if not 1 <= task.max_target_tokens < data.max_length:
        raise ConfigError(
            f"task.max_target_tokens must be >= 1 and leave room for the prompt in data.max_length={data.max_length}, got {task.max_target_tokens}"
        )
    if task.max_eval_generations < 0:
        raise ConfigError(f"task.max_eval_generations must be >= 0 (0: none), got {task.max_eval_generations}")
    if data.partition == "dirichlet":
        raise ConfigError("data.partition=dirichlet splits by class label; task.kind=generation has none (use iid)")


def _validate_data_fields(cfg: RunConfig) -> None:
    """A field setting the task (or the data format) does not read is an error, not ignored.

    ``text_field``/``label_field`` have defaults, so only a value other than the default counts as set.
    """
    task, data = cfg.task, cfg.data
    set_fields = {
        "data.text_field": data.text_field != "sentence",
        "data.label_field": data.label_field not in ("label", None),
        "data.prompt_field": data.prompt_field is not None,
        "data.target_field": data.target_field is not None,
    }
    used = {
        "classification": {"data.text_field", "data.label_field"},
        "generation": {"data.prompt_field", "data.target_field"},
        "language_modeling": {"data.text_field"},
    }.get(task.kind, set())
    if data.format in (*SUPERGLUE_FORMATS, *SUMMARIZATION_FORMATS, "text"):
        used = set()  # these formats know their fields (or have none)
    for key, is_set in set_fields.items():
        if is_set and key not in used:
            reader = f"data.format={data.format}" if not used else f"task.kind={task.kind}"
            raise ConfigError(f"{key}={getattr(data, key.split('.')[1])!r} is set but {reader} does not read it")
    if data.format == "text" and task.kind not in ("language_modeling", "generation"):
        raise ConfigError(f"data.format=text (plain text) is for task.kind=language_modeling, got {task.kind!r}")
    if "{client}" in data.train_path and data.partition != "none":
        raise ConfigError(
            f"data.train_path={data.train_path!r} has a {{client}} placeholder (one file per client) but "
            f"data.partition={data.partition} divides one file: set data.partition=none"
        )


def _validate_privacy(p: PrivacyConfig) -> None:
    for key in ("hidden_clip", "hidden_noise", "grad_clip", "grad_noise"):
        value = getattr(p, key)
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"privacy.{key} must be finite and >= 0 (0: off), got {value}")
    unknown = [name for name in p.private_blocks if name not in PRIVATE_BLOCKS]
    if unknown:
        raise ConfigError(f"privacy.private_blocks may name only {list(PRIVATE_BLOCKS)}, got {unknown}")
    if len(set(p.private_blocks)) != len(p.private_blocks):
        raise ConfigError(f"privacy.private_blocks names a part twice: {p.private_blocks}")
    if p.secret_init and not p.private_blocks:
        raise ConfigError("privacy.secret_init re-draws the private blocks: set privacy.private_blocks (input and/or output)")
    if p.noise_seed is not None and p.noise_seed < 0:
        raise ConfigError(f"privacy.noise_seed must be >= 0 or null (a secret seed), got {p.noise_seed}")


def _validate_checkpoints(cfg: RunConfig) -> None:
    s = cfg.server
    if s.checkpoint_every < 0:
        raise ConfigError(f"server.checkpoint_every must be >= 0 (0: never), got {s.checkpoint_every}")
    if not (s.client_timeout_s > 0 and math.isfinite(s.client_timeout_s)):
        raise ConfigError(f"server.client_timeout_s must be finite and > 0, got {s.client_timeout_s}")
    if not (s.rejoin_timeout_s >= 0 and math.isfinite(s.rejoin_timeout_s)):
        raise ConfigError(f"server.rejoin_timeout_s must be finite and >= 0 (0: do not wait), got {s.rejoin_timeout_s}")
    if s.checkpoint_keep < 2:
        raise ConfigError(f"server.checkpoint_keep must be >= 2 (a party may be one round ahead at a crash), got {s.checkpoint_keep}")
    if s.checkpoint_every and (s.parallelism == "hierarchical" or s.sub_servers > 1):
        raise ConfigError("server.checkpoint_every is not supported with hierarchical sub-servers yet; use sequential or client_batching")


def _validate_link(cfg: RunConfig) -> None:
    f, faults = cfg.federation, cfg.faults
    if f.max_retries < 0:
        raise ConfigError(f"federation.max_retries must be >= 0, got {f.max_retries}")
    for key, value in (("federation.retry_backoff_s", f.retry_backoff_s), ("federation.retry_backoff_max_s", f.retry_backoff_max_s)):
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{key} must be finite and >= 0, got {value}")
    probabilities = {"faults.drop_request": faults.drop_request, "faults.drop_reply": faults.drop_reply, "faults.duplicate": faults.duplicate}
    for key, value in probabilities.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must be a probability in [0, 1], got {value}")
    if sum(probabilities.values()) > 1.0:
        raise ConfigError(f"faults.drop_request + faults.drop_reply + faults.duplicate must not exceed 1, got {sum(probabilities.values())}")
    if faults.kill_server_at_step < 0:
        raise ConfigError(f"faults.kill_server_at_step must be >= 0 (0: never), got {faults.kill_server_at_step}")
    if faults.kill_client_at_step < 0:
        raise ConfigError(f"faults.kill_client_at_step must be >= 0 (0: never), got {faults.kill_client_at_step}")
    if not 0 <= faults.kill_client < f.num_clients:
        raise ConfigError(f"faults.kill_client must be one of the clients 0..{f.num_clients - 1}, got {faults.kill_client}")
    if f.membership == "dynamic" and (cfg.server.sub_servers > 1 or cfg.server.parallelism == "hierarchical"):
        raise ConfigError("federation.membership=dynamic runs one server process; hierarchical sub-servers need torchrun (static)")
    if (faults.drop_request or faults.drop_reply) and f.max_retries == 0:
        raise ConfigError("faults.drop_request/drop_reply lose messages; they need federation.max_retries >= 1")
    _validate_socket_link(cfg)


def _validate_socket_link(cfg: RunConfig) -> None:
    link = cfg.link
    if not 0 <= link.edge_port < 65536:
        raise ConfigError(f"link.edge_port must be in [0, 65535] (0: a free port), got {link.edge_port}")
    for key, value in (("link.max_frame_mb", link.max_frame_mb), ("link.first_frame_timeout_s", link.first_frame_timeout_s)):
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{key} must be finite and > 0, got {value}")
    if link.max_connections < 1 or link.max_connections_per_client < 1:
        raise ConfigError("link.max_connections and link.max_connections_per_client must be >= 1")
    if link.transport != "socket":
        return
    if cfg.federation.membership != "static":
        raise ConfigError("link.transport=socket needs no RPC group (clients come and go on their own): leave federation.membership=static")


def _validate_sub_servers(cfg: RunConfig) -> None:
    s = cfg.server
    if s.sub_servers > 1 and s.parallelism not in ("hierarchical", "auto"):
        raise ConfigError(f"server.sub_servers={s.sub_servers} needs server.parallelism=hierarchical (or auto), got {s.parallelism!r}")
    if s.sub_servers > cfg.federation.num_clients:
        raise ConfigError(
            f"server.sub_servers={s.sub_servers} is more than federation.num_clients="
            f"{cfg.federation.num_clients}: every sub-server needs at least one client"
        )
