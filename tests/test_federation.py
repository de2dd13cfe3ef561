"""Real federations on loopback: a torchrun'd server and clients, compared with centralized runs.

Each run has a hard timeout; on failure the error shows every process's log tail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from flglm.config import load_config
from flglm.crypto.keyring import generate_key_set
from flglm.data import write_demo_dataset
from flglm.export import export_run
from flglm.jobs.edge_processes import run_edge_federation
from flglm.jobs.subprocesses import FederationFailed, run_federation
from flglm.jobs.train import run_centralized
from flglm.models import build_full_model
from flglm.tensor_files import load_tensors

pytestmark = pytest.mark.multiprocess

TINY_GLM = {
    "model_type": "glm",
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def write_config(tmp_path: Path, **sections: dict) -> Path:
    train, dev = write_demo_dataset(tmp_path / "data", train_rows=400, dev_rows=48, seed=1)
    cfg = {
        "seed": 3,
        "model": {"config": TINY_GLM},
        "optim": {"name": "adamw", "lr": 0.01, "scheduler": "linear", "warmup_steps": 3},
        "data": {
            "train_path": str(train),
            "dev_path": str(dev),
            "max_length": 32,
            "batch_size": 8,
            "eval_batch_size": 48,
            "tokenizer_vocab_size": 256,
        },
        "trainer": {"max_epochs": 1, "max_steps": 20, "gradient_clip_val": 0.5, "enable_progress_bar": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    cfg.setdefault("crypto", {}).setdefault("key_dir", str(tmp_path / "keys"))
    generate_key_set(tmp_path / "keys", num_clients=4)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def federated_and_centralized(tmp_path: Path, config: Path) -> tuple[dict, dict]:
    """Run a 1-client federation (``tmp_path/fed``) and the centralized run (``tmp_path/central``)
    of ``config``; return the client's and the centralized ``metrics.json``."""
    run_federation(config, num_clients=1, run_dir=tmp_path / "fed", timeout_s=240)
    cfg = load_config(config, [f"run_dir={tmp_path / 'central'}", "federation.num_clients=1"])
    torch.set_num_threads(1)
    run_centralized(cfg)
    fed = json.loads((tmp_path / "fed" / "client0" / "metrics.json").read_text())
    central = json.loads((tmp_path / "central" / "centralized" / "metrics.json").read_text())
    return fed, central


def merged_weights(run_dir: Path, client: int = 0) -> dict[str, torch.Tensor]:
    weights = load_tensors(run_dir / f"client{client}" / "client_blocks.safetensors")
    weights.update(load_tensors(run_dir / "server" / "middle.safetensors"))
    return weights


@pytest.mark.parametrize(
    "trainer",
    [
        # clipping by value: the server's step goes with the backward (two round trips a step)
        pytest.param({"gradient_clip_algorithm": "value"}, id="fp32-clip-by-value"),
        pytest.param({"accumulate_grad_batches": 2}, id="grad-accumulation"),
        pytest.param({"precision": "bf16-mixed"}, id="bf16-mixed"),
    ],
)
def test_one_client_federation_equals_centralized_training(tmp_path: Path, trainer: dict) -> None:
    # Prepare: 20 optimizer steps, AdamW with warm-up + linear decay, clipping (by global norm
    # unless by value), and Lightning's accumulation / precision settings unchanged.
    config = write_config(tmp_path, trainer=trainer)
    fed_dir = tmp_path / "fed"
    micro_batches = 20 * trainer.get("accumulate_grad_batches", 1)

    # Execute
    fed, central = federated_and_centralized(tmp_path, config)
    cfg = load_config(config, [f"run_dir={tmp_path / 'central'}", "federation.num_clients=1"])

    # Assert: per-step losses and final weights equal within 1e-5.
    assert len(fed["losses"]) == len(central["losses"]) == micro_batches
    assert fed["losses"] == pytest.approx(central["losses"], abs=1e-5)
    fed_weights = merged_weights(fed_dir)
    central_weights = load_tensors(tmp_path / "central" / "centralized" / "model.safetensors")
    assert sorted(fed_weights) == sorted(central_weights)
    for name, value in central_weights.items():
        torch.testing.assert_close(fed_weights[name], value, atol=1e-5, rtol=0, msg=name)
    assert fed["metrics"]["val_acc"] == pytest.approx(central["metrics"]["val_acc"])
    exported = AutoModelForCausalLM.from_pretrained(export_run(fed_dir, tmp_path / "exported"))
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, central_weights[name], atol=1e-5, rtol=0, msg=name)
    initial = build_full_model(cfg.model).state_dict()
    assert not torch.allclose(fed_weights["model.layers.2.mlp.down_proj.weight"], initial["model.layers.2.mlp.down_proj.weight"])
    # forward + backward(+step) per micro-batch; clipping by norm adds grad_norms and a step message
    link = json.loads((fed_dir / "summary.json").read_text())["link"]
    accumulate = trainer.get("accumulate_grad_batches", 1)
    folded = accumulate == 1 and trainer.get("gradient_clip_algorithm") == "value"
    assert link["optimizer_steps"] == 20
    assert link["round_trips_per_step"] == (2.0 if folded else 2 * accumulate + 2)


def test_two_clients_end_with_identical_client_blocks_and_a_summary(tmp_path: Path) -> None:
    # FedAvg every step: the first round already weighs each client by the batch it trained on
    config = write_config(tmp_path, federation={"aggregate_every": 1}, trainer={"max_steps": 12, "gradient_clip_val": None})
    run_dir = tmp_path / "run"

    run_federation(config, num_clients=2, run_dir=run_dir, timeout_s=240)

    first = load_tensors(run_dir / "client0" / "client_blocks.safetensors")
    second = load_tensors(run_dir / "client1" / "client_blocks.safetensors")
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=0, rtol=0, msg=name)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["clients"]) == {"0", "1"}
    assert summary["server"]["steps"] == 24  # 12 per client, served one client step at a time
    assert summary["server"]["forwards"] == summary["server"]["backwards"]
    assert summary["link"]["round_trips_per_step"] == 2.0  # no clipping: each step's server step went with its backward
    assert summary["clients"]["0"]["fedavg_rounds"] == 12  # securely aggregated (masked) rounds
    assert summary["clients"]["0"]["narrow_uploads"] == 12  # each a 32-bit upload: the values fit
    assert 0.0 <= summary["federation"]["val_acc"] <= 1.0
    assert (run_dir / "client0" / "logs" / "metrics.csv").is_file()
    # each side's peak memory (CPU here: host memory only)
    assert summary["memory"]["server"]["peak_host_mb"] > 50 and "peak_device_mb" not in summary["memory"]["server"]
    assert {c: set(m) for c, m in summary["memory"]["clients"].items()} == {"0": {"peak_host_mb"}, "1": {"peak_host_mb"}}


def test_a_missing_data_file_fails_fast_with_its_path(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    missing = tmp_path / "nowhere" / "train.tsv"

    with pytest.raises(FederationFailed) as failure:
        run_federation(config, [f"data.train_path={missing}"], num_clients=1, run_dir=tmp_path / "run", timeout_s=120)

    assert str(missing) in str(failure.value)


@pytest.mark.parametrize("transport", ["rpc", "socket"])
def test_two_clients_with_client_batching_share_each_server_step(tmp_path: Path, transport: str) -> None:
    config = write_config(
        tmp_path,
        federation={"aggregate_every": 4},
        server={"parallelism": "client_batching", "batch_window_ms": 2000},
        trainer={"max_steps": 8, "accumulate_grad_batches": 2},  # and global-norm clipping (write_config)
    )
    run_dir = tmp_path / "run"

    launch = run_federation if transport == "rpc" else run_edge_federation
    launch(config, num_clients=2, run_dir=run_dir, timeout_s=240)

    summary = json.loads((run_dir / "summary.json").read_text())
    server = summary["server"]
    assert server["steps"] == server["groups"] == 8  # one server step per group of both clients
    assert server["mean_group_size"] == 2.0 and server["dropped_members"] == 0
    assert server["forwards"] == server["backwards"] == 32  # 2 clients x 8 steps x 2 micro-batches
    first = load_tensors(run_dir / "client0" / "client_blocks.safetensors")
    second = load_tensors(run_dir / "client1" / "client_blocks.safetensors")
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=0, rtol=0, msg=name)
