"""Bad input gets a clear error naming what is wrong, before any training work is done."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL_CONFIGS

from flglm.config import ConfigError, load_config
from flglm.data import EmptyPartitionError, write_demo_dataset
from flglm.data.loading import build_tokenizer, check_fits_model, client_train_examples, task_prompt
from flglm.input_files import check_client_inputs, client_input_files
from flglm.tasks import PromptCollator, PromptError


def _config(tmp_path: Path, *overrides: str):
    train, dev = write_demo_dataset(tmp_path / "data", train_rows=40, dev_rows=8)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"config": TINY_MODEL_CONFIGS["glm"]},
        "data": {"train_path": str(train), "dev_path": str(dev), "tokenizer_vocab_size": 128},
        "run_dir": str(tmp_path / "run"),
    }))
    return load_config(path, list(overrides))


def test_a_missing_training_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "absent.tsv"
    cfg = _config(tmp_path, f"data.train_path={missing}")

    with pytest.raises(FileNotFoundError, match=str(missing)):
        client_train_examples(cfg, 0)


def test_a_client_names_its_first_missing_data_file_before_reading_any(tmp_path: Path) -> None:
    # Prepare: per-client files (client 1's is missing), a validation file, and a directory
    data = tmp_path / "own"
    data.mkdir()
    (data / "client0.tsv").write_text("label\tsentence\n1\tfine\n")
    own = ["data.train_path=" + str(data / "client{client}.tsv"), "data.partition=none", "federation.num_clients=2"]

    # Execute / Assert: each client checks only its own files
    check_client_inputs(_config(tmp_path, *own), 0)
    with pytest.raises(FileNotFoundError, match=f"data.train_path: file not found: {data / 'client1.tsv'}"):
        check_client_inputs(_config(tmp_path, *own), 1)
    with pytest.raises(FileNotFoundError, match=f"data.dev_path: file is not a file: {data}"):
        check_client_inputs(_config(tmp_path, f"data.dev_path={data}"), 0)
    assert [s for s, _ in client_input_files(_config(tmp_path, *own), 1)] == ["data.train_path", "data.dev_path"]


def test_an_empty_client_partition_names_the_client(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "data.max_train_rows=3", "federation.num_clients=4")

    with pytest.raises(EmptyPartitionError, match="client 0 of 4 has no examples"):
        client_train_examples(cfg, 0)


def test_an_empty_own_file_is_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "client0.tsv"
    empty.write_text("label\tsentence\n")
    cfg = _config(tmp_path, f"data.train_path={tmp_path}/client{{client}}.tsv", "data.partition=none")

    with pytest.raises(ValueError, match="client0.tsv"):
        client_train_examples(cfg, 0)


def test_sequences_longer_than_the_model_allows_are_refused_with_both_numbers(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "data.max_length=100")
    tokenizer = build_tokenizer(cfg, save=False)

    with pytest.raises(ConfigError, match=r"data.max_length=100 .* limit of 64"):
        check_fits_model(cfg, tokenizer, vocab_size=128, max_positions=64)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "data.tokenizer_vocab_size=500")
    tokenizer = build_tokenizer(cfg, save=False)

    with pytest.raises(ConfigError, match="vocabulary has 16"):
        check_fits_model(cfg, tokenizer, vocab_size=16, max_positions=64)


def test_a_label_word_the_tokenizer_does_not_know_is_named(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    tokenizer = build_tokenizer(cfg, save=False)

    with pytest.raises(PromptError, match="'zyzzyva'"):
        PromptCollator(tokenizer, task_prompt(cfg), ["negative", "zyzzyva"], cfg.data.max_length)


def test_a_split_that_leaves_the_server_nothing_is_refused_before_training(tmp_path: Path) -> None:
    from flglm.models import SplitError, plan_split

    with pytest.raises(SplitError, match="2 \\+ 2 = 4 blocks .* only 4"):
        plan_split(4, client_head_layers=2, client_tail_layers=2)
