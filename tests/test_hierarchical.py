"""Hierarchical serving: sub-servers with their own replicas, synchronised at FedAvg rounds.

Real torchrun federations on loopback, and socket-link ones of processes on their own (hard
timeouts; every process's log on failure).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from flglm.config import load_config
from flglm.data.loading import build_tokenizer
from flglm.jobs.edge_processes import run_edge_federation
from flglm.jobs.subprocesses import REPO_ROOT, run_federation, run_torchrun
from flglm.jobs.train import run_centralized
from flglm.tensor_files import load_tensors
from tests.test_federation import write_config

pytestmark = pytest.mark.multiprocess


def _own_files(tmp_path: Path, config: Path, rows: tuple[int, int]) -> list[str]:
    """Each client's own training file (``data.partition=none``), of different lengths, cut from
    the config's training file, and a tokenizer trained on that file for all of them."""
    cfg = load_config(config, [f"run_dir={tmp_path / 'tok'}"])
    header, *lines = Path(cfg.data.train_path).read_text().splitlines()
    start = 0
    for client, count in enumerate(rows):
        (tmp_path / "data" / f"client{client}.tsv").write_text("\n".join([header, *lines[start : start + count]]) + "\n")
        start += count
    build_tokenizer(cfg, save=True)
    return [
        f"data.train_path={tmp_path / 'data'}/client{{client}}.tsv",
        "data.partition=none",
        f"data.tokenizer_path={tmp_path / 'tok' / 'tokenizer'}",
        "data.shuffle=false",  # a replica trained alone sees its client's batches in the same order
    ]


def _fedavg(parts: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {name: sum(p[name].double() * (w / total) for p, w in zip(parts, weights)).float() for name in parts[0]}


def test_two_sub_servers_equal_the_fedavg_of_separately_trained_replicas(tmp_path: Path) -> None:
    rows = (48, 32)  # 6 and 4 steps of 8: FedAvg weights 48:32 for client blocks and middle stacks
    config = write_config(tmp_path, federation={"aggregate_every": 0}, trainer={"max_steps": -1, "max_epochs": 1})
    data = _own_files(tmp_path, config, rows)

    # With plain FedAvg over torch RPC (`auto` chooses the mode), and with secure aggregation (the
    # two clients' masks cancel only in the sum of both sub-servers' partial sums) over the socket
    # link, each sub-server a process on its own. (Secure rounds across torch-RPC sub-servers:
    # tests/test_secure_sub_servers.py and the next test here.)
    hierarchical = {}
    for transport, secure in (("rpc", False), ("socket", True)):
        run_dir = tmp_path / f"hier-{transport}-secure-{secure}"
        overrides = [*data, f"crypto.secure_aggregation={str(secure).lower()}"]
        if not secure:
            overrides.append("server.parallelism=auto")
        launch = run_federation if transport == "rpc" else run_edge_federation
        launch(config, overrides, num_clients=2, sub_servers=2, run_dir=run_dir, timeout_s=240)
        hierarchical[(transport, secure)] = run_dir

    # Each replica alone: sub-server s trained with client s only, i.e. a 1-client federation whose
    # only client reads client s's file (its one FedAvg round is the identity), which trains exactly
    # as the centralized run on that file (tests/test_federation.py): run here, in this process.
    middle_names = set(load_tensors(hierarchical[("rpc", False)] / "server" / "middle.safetensors"))
    replicas = []
    for client in (0, 1):
        own = [*data, f"data.train_path={tmp_path / 'data'}/client{client}.tsv", f"run_dir={tmp_path / f'alone{client}'}"]
        torch.set_num_threads(1)  # as each federation process
        run_centralized(load_config(config, [*own, "federation.num_clients=1"]))
        replicas.append(load_tensors(tmp_path / f"alone{client}" / "centralized" / "model.safetensors"))

    weights = [float(r) for r in rows]
    expected_middle = _fedavg([{n: t for n, t in r.items() if n in middle_names} for r in replicas], weights)
    expected_blocks = _fedavg([{n: t for n, t in r.items() if n not in middle_names} for r in replicas], weights)
    for (transport, secure), hier in hierarchical.items():
        middle = load_tensors(hier / "server" / "middle.safetensors")
        for name, value in expected_middle.items():
            torch.testing.assert_close(middle[name], value, atol=1e-6, rtol=1e-5, msg=f"{transport} secure={secure} {name}")
        for client in (0, 1):
            blocks = load_tensors(hier / f"client{client}" / "client_blocks.safetensors")
            # secure aggregation sums fixed-point values with 24 fractional bits (resolution 6e-8)
            for name, value in expected_blocks.items():
                torch.testing.assert_close(blocks[name], value, atol=1e-6, rtol=1e-5, msg=f"{transport} secure={secure} client{client} {name}")

        summary = json.loads((hier / "summary.json").read_text())
        assert summary["parallelism"]["mode"] == "hierarchical" and summary["parallelism"]["sub_servers"] == 2
        if not secure:
            assert "sub_servers=2" in summary["parallelism"]["reason"]  # auto's choice, and why
        assert [s["clients"] for s in summary["sub_servers"]] == [["0"], ["1"]]
        assert [s["server"]["steps"] for s in summary["sub_servers"]] == [6, 4]  # each served its own client only
        assert summary["server"]["steps"] == 10
        sub_servers = [s["server"] for s in summary["sub_servers"]]
        assert sub_servers[0]["middle_syncs"] == 2  # at the round, and the final one
        assert sub_servers[0]["middle_sha256"] == sub_servers[1]["middle_sha256"]


def test_three_clients_on_two_sub_servers_with_unequal_data_finish_in_step(tmp_path: Path) -> None:
    # Sub-server 0 serves clients 0 and 2, sub-server 1 client 1; client 2 has less data, so
    # it leaves first and its sub-server goes on with client 0 alone; FedAvg every 2 steps,
    # middle stacks averaged every 2 rounds and at the end.
    config = write_config(tmp_path, federation={"aggregate_every": 2}, trainer={"max_steps": -1, "max_epochs": 2})
    cfg = yaml.safe_load(config.read_text())
    # unequal shares of 120 rows: the clients' epochs differ in length
    cfg["data"] |= {"partition": "dirichlet", "alpha": 100.0, "max_train_rows": 120}
    config.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"

    # through the hierarchical launcher, with secure aggregation (the default)
    args = ["--sub-servers", "2", "--config", str(config), f"run_dir={run_dir}", "federation.num_clients=3", "server.sync_every=2"]
    run_torchrun(REPO_ROOT / "launch" / "hierarchical.py", args, nproc=5, timeout_s=300, run_dir=run_dir)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["clients"]) == {"0", "1", "2"}
    assert [s["clients"] for s in summary["sub_servers"]] == [["0", "2"], ["1"]]
    rounds = {i: summary["clients"][str(i)]["fedavg_rounds"] for i in range(3)}
    assert len(set(rounds.values())) > 1  # the shares differ, so some client finished early
    # every masked upload went 32 bits wide across the sub-servers; a round a client is alone in
    # (after the others finished) is sent in the clear, not masked, so it is no narrow upload
    shared_rounds = sorted(rounds.values())[-2]
    assert all(summary["clients"][str(i)]["narrow_uploads"] == min(rounds[i], shared_rounds) for i in range(3))
    sub_servers = [s["server"] for s in summary["sub_servers"]]
    # every sub-server took part in every global round (with nothing, once its clients had left)
    assert sub_servers[0]["sync_rounds"] == sub_servers[1]["sync_rounds"] == max(rounds.values())
    assert sub_servers[0]["middle_sha256"] == sub_servers[1]["middle_sha256"]  # one middle stack at the end
    # the clients of the last round, whichever sub-server serves them, hold the same blocks
    last = [i for i, r in rounds.items() if r == max(rounds.values())]
    blocks = [load_tensors(run_dir / f"client{i}" / "client_blocks.safetensors") for i in last]
    assert len(last) >= 1
    for name in blocks[0]:
        for other in blocks[1:]:
            torch.testing.assert_close(other[name], blocks[0][name], atol=0, rtol=0, msg=name)
