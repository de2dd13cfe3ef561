"""``flglm attack`` on a saved run: reads the run's config, tokenizer and client/server weights,
attacks held-out text, prints the figures and writes them as JSON; bad input gets a clear error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from flglm.cli import main
from flglm.config import load_config
from flglm.data import write_demo_dataset
from flglm.data.loading import build_tokenizer
from flglm.jobs.train import save_run_config
from flglm.models import ClientBlocks
from flglm.models.split import MiddleStack, plan_for, saved_state_dict
from flglm.run_layout import client_weights_path, middle_weights_path
from flglm.tensor_files import save_tensors


@pytest.fixture
def saved_run(tmp_path: Path, tiny_model_configs: dict[str, dict[str, Any]]) -> Path:
    """A run directory as a finished federation leaves it (weights at their initial values)."""
    train, dev = write_demo_dataset(tmp_path / "data", train_rows=200, dev_rows=40)
    config = tmp_path / "in.yaml"
    model = {**tiny_model_configs["glm"], "vocab_size": 512}
    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "run"),
                "model": {"config": model},
                "data": {"train_path": str(train), "dev_path": str(dev), "tokenizer_vocab_size": 512, "max_length": 24},
            }
        )
    )
    cfg = load_config(config)
    save_run_config(cfg)
    build_tokenizer(cfg, save=True)
    plan = plan_for(cfg.model, cfg.split)
    save_tensors(saved_state_dict(ClientBlocks(cfg.model, plan).hf), client_weights_path(cfg.run_dir, 0))
    save_tensors(saved_state_dict(MiddleStack(cfg.model, plan).hf), middle_weights_path(cfg.run_dir))
    return Path(cfg.run_dir)


def test_attack_command_reports_every_channel(saved_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dev = tmp_path / "data" / "dev.tsv"
    public = tmp_path / "data" / "train.tsv"
    out = tmp_path / "attack.json"

    code = main(["attack", "--config", str(saved_run / "config.yaml"), "--text", str(dev), "--public", str(public), "--rows", "6", "--public-rows", "100", "--inversion-steps", "100", "--out", str(out)])

    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(out.read_text())
    assert result["positive_control"] >= 0.95
    assert result["server"]["candidate_search"]["token_accuracy"] >= 0.95  # public client blocks: the text is recovered
    assert result["peer_encrypted"]["token_accuracy"] == 0.0 and not result["peer_encrypted"]["opened"]
    assert "curious server, candidate_search: token accuracy 1.000" in printed and f"wrote {out}" in printed


def test_attack_command_names_a_missing_file(saved_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["attack", "--config", str(saved_run / "config.yaml"), "--text", str(tmp_path / "nope.tsv"), "--public", str(tmp_path / "nope.tsv")])
    assert code == 2
    assert "nope.tsv" in capsys.readouterr().err
