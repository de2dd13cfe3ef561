"""Shared fixtures: one intra-op thread per test session, and tiny configs of every supported architecture."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from flglm.config import RunConfig, load_config

_ROTARY_COMMON: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "attention_dropout": 0.0,
}

TINY_MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "glm": {"model_type": "glm", **_ROTARY_COMMON},
    "glm4": {"model_type": "glm4", **_ROTARY_COMMON},
    "llama": {"model_type": "llama", **_ROTARY_COMMON},
    "qwen2": {"model_type": "qwen2", **_ROTARY_COMMON},
    "mistral": {"model_type": "mistral", **_ROTARY_COMMON},
    "gpt2": {
        "model_type": "gpt2",
        "vocab_size": 128,
        "n_embd": 64,
        "n_layer": 4,
        "n_head": 4,
        "n_inner": 128,
        "n_positions": 64,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "summary_first_dropout": 0.0,
    },
}
"""Architecture name -> Hugging Face config dict (with ``model_type``) of a 4-block model."""


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, and parallel test runs do not oversubscribe the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_model_configs() -> dict[str, dict[str, Any]]:
    """A fresh copy per test, so a test may edit its config freely."""
    return {name: dict(config) for name, config in TINY_MODEL_CONFIGS.items()}


@pytest.fixture
def make_run_config(tmp_path: Path) -> Callable[..., RunConfig]:
    """``make_run_config(model_config, *overrides)``: a validated RunConfig for that model.

    Goes through ``load_config`` (a YAML file plus ``key=value`` overrides), as the launcher does.
    """

    def make(model_config: dict[str, Any], *overrides: str) -> RunConfig:
        path = tmp_path / "run.yaml"
        # JSON is YAML; it keeps the nested model config dict intact.
        path.write_text(json.dumps({"model": {"config": model_config}, "data": {"train_path": "unused.tsv"}}))
        return load_config(path, overrides)

    return make


@pytest.fixture(scope="session")
def finished_one_client_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One finished encrypted 1-client federation over torch RPC: (its config, its run_dir).

    64 rows, 3 epochs of 8 steps (so two re-key handshakes), the server on one thread. Started
    once for the session (a federation's start-up is most of its cost) and read-only: the tests
    that compare with it read it, those that start on a finished run copy it first.
    """
    from flglm.jobs.subprocesses import run_federation
    from tests.test_federation import write_config

    root = tmp_path_factory.mktemp("one-client-run")
    config = write_config(root, data={"max_train_rows": 64}, trainer={"max_epochs": 3, "max_steps": -1}, server={"num_threads": 1})
    run_federation(config, num_clients=1, run_dir=root / "run", timeout_s=240)
    return config, root / "run"
