"""Tests for flglm.config: loading, validation (errors name the key) and the fingerprint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from flglm.config import ConfigError, ModelConfig, RunConfig, fingerprint, load_config, to_yaml

REQUIRED = ("data.train_path=train.tsv", "model.config={model_type: llama, vocab_size: 128}")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_minimal_config_loads_with_defaults() -> None:
    cfg = load_config(None, REQUIRED)

    assert isinstance(cfg, RunConfig) and isinstance(cfg.model, ModelConfig)
    assert cfg.data.train_path == "train.tsv"
    assert cfg.model.config == {"model_type": "llama", "vocab_size": 128}
    assert cfg.optim.name == "adamw" and cfg.data.batch_size == 16


@pytest.mark.parametrize("key", ["optim.lrr", "bogus", "server.max_batch", "data.text"])
def test_unknown_override_key_is_named(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        load_config(None, [*REQUIRED, f"{key}=1"])


def test_unknown_key_in_the_file_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "data:\n  train_path: train.tsv\n  batchsize: 8\n")

    with pytest.raises(ConfigError, match=r"data\.batchsize"):
        load_config(path, [REQUIRED[1]])


@pytest.mark.parametrize(
    "override", ["data.batch_size=abc", "split.client_head_layers=1.5", "optim.lr=fast", "data.shuffle=maybe", "optim.betas=abc"]
)
def test_wrong_type_names_the_key(override: str) -> None:
    key = override.split("=")[0]

    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        load_config(None, [*REQUIRED, override])


def test_missing_train_path_is_named() -> None:
    with pytest.raises(ConfigError, match=r"missing .*data\.train_path"):
        load_config(None, [REQUIRED[1]])


@pytest.mark.parametrize(
    "override",
    [
        "optim.name=adam",
        "optim.scheduler=step",
        "data.partition=random",
        "task.kind=qa",
        "trainer.gradient_clip_algorithm=l2",
        "model.attn_implementation=flash",
        "peft.method=prefix",
        "server.parallelism=fastest",
        "link.wire_dtype=int4",
    ],
)
def test_choice_validation_names_the_key_and_the_choices(override: str) -> None:
    key, value = override.split("=")

    with pytest.raises(ConfigError, match=rf"{key}='{value}' is not one of \[") as err:
        load_config(None, [*REQUIRED, override])
    assert "'" in str(err.value).split("is not one of")[1]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("federation.num_clients=0", "federation.num_clients"),
        ("data.batch_size=0", "data.batch_size"),
        ("server.max_pending_per_client=0", "server.max_pending_per_client"),
        ("server.max_batch_size=0", "server.max_batch_size"),
        ("split.client_head_layers=-1", "split.client_head_layers"),
        ("optim.warmup_steps=-2", "optim.warmup_steps"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("optim.lr=inf", "optim.lr"),
        ("data.alpha=-0.5", "data.alpha"),
        ("data.alpha=nan", "data.alpha"),
        ("task.label_words=[yes]", "task.label_words"),
        ("task.prompt=no placeholder", "task.prompt"),
        ("peft.lora_r=0", "peft.lora_r"),
        ("peft.lora_dropout=1.0", "peft.lora_dropout"),
        ("peft.target_modules=[]", "peft.target_modules"),
        ("server.sync_timeout_s=0", "server.sync_timeout_s"),
        ("server.num_threads=-1", "server.num_threads"),
        ("server.rejoin_timeout_s=-1", "server.rejoin_timeout_s"),
        ("faults.kill_client_at_step=-1", "faults.kill_client_at_step"),
        ("faults.kill_client=1", "faults.kill_client"),
        ("federation.membership=elastic", "federation.membership"),
    ],
)
def test_out_of_range_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        load_config(None, [*REQUIRED, override])


def test_model_needs_exactly_one_of_path_and_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"exactly one of model\.path .* model\.config"):
        load_config(None, ["data.train_path=train.tsv"])
    with pytest.raises(ConfigError, match=r"exactly one of model\.path .* model\.config"):
        load_config(None, [*REQUIRED, f"model.path={tmp_path}"])
    # One of them alone is fine.
    assert load_config(None, ["data.train_path=train.tsv", f"model.path={tmp_path}"]).model.path == str(tmp_path)


def test_model_config_needs_a_model_type() -> None:
    with pytest.raises(ConfigError, match="model_type"):
        load_config(None, ["data.train_path=train.tsv", "model.config={vocab_size: 128}"])


def test_overrides_merge_over_the_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "model:\n  config:\n    model_type: glm\n    hidden_size: 64\n"
        "optim:\n  lr: 0.01\n  name: sgd\n"
        "data:\n  train_path: train.tsv\n  batch_size: 8\n",
    )

    cfg = load_config(path, ["optim.lr=0.5", "model.config.hidden_size=32", "data.eval_batch_size=3"])

    assert cfg.optim.lr == 0.5  # overridden
    assert cfg.optim.name == "sgd" and cfg.data.batch_size == 8  # kept from the file
    assert cfg.data.eval_batch_size == 3  # default replaced by an override
    assert cfg.model.config == {"model_type": "glm", "hidden_size": 32}  # nested dicts merge key by key
    assert cfg.optim.weight_decay == 0.0  # schema default


def test_missing_file_and_malformed_override_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, [*REQUIRED, "optim.lr"])


def test_saved_yaml_loads_back_identically(tmp_path: Path) -> None:
    cfg = load_config(None, [*REQUIRED, "optim.lr=0.25", "federation.num_clients=3"])

    again = load_config(_write(tmp_path, to_yaml(cfg)))

    assert again == cfg
    assert fingerprint(again) == fingerprint(cfg)


def test_fingerprint_ignores_run_dir_and_display_but_not_what_is_computed() -> None:
    cfg = load_config(None, REQUIRED)

    same = [
        load_config(None, [*REQUIRED, "run_dir=/elsewhere"]),
        load_config(None, [*REQUIRED, "trainer.enable_progress_bar=false"]),
    ]
    different = [
        load_config(None, [*REQUIRED, "optim.lr=0.002"]),
        load_config(None, [*REQUIRED, "seed=1"]),
        load_config(None, [*REQUIRED, "model.config.vocab_size=256"]),
        load_config(None, [*REQUIRED, "split.client_tail_layers=2"]),
        load_config(None, [*REQUIRED, "link.wire_dtype=int8"]),  # both sides must decode what the other encodes
    ]

    assert all(fingerprint(other) == fingerprint(cfg) for other in same)
    assert len({fingerprint(cfg), *(fingerprint(other) for other in different)}) == 1 + len(different)
    assert fingerprint(dataclasses.replace(cfg)) == fingerprint(cfg)  # a copy hashes alike


def test_dynamic_membership_refuses_hierarchical_sub_servers() -> None:
    with pytest.raises(ConfigError, match=r"federation.membership=dynamic runs one server process"):
        hierarchical = ["federation.num_clients=2", "server.sub_servers=2", "server.parallelism=hierarchical"]
        load_config(None, [*REQUIRED, *hierarchical, "federation.membership=dynamic"])
