"""Secure aggregation across two sub-servers: two real processes joined by a gloo group.

Sub-server ``s`` serves clients ``s`` and ``s + 2`` (threads, with real pairwise maskers); each
holds only its own clients' masked uploads. The rounds run through ``SecureRounds`` with
``SubServerSync`` as coordinator, as in a hierarchical federation.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flglm.aggregation.fedavg import fedavg
from flglm.aggregation.masking import PairwiseMasker
from flglm.aggregation.secure_rounds import SecureRounds
from flglm.callbacks import FedAvgCallback
from flglm.crypto.keyring import generate_key_set, load_client_keys
from flglm.jobs.edge_processes import free_local_port
from flglm.link.protocol import WirePlan
from flglm.server.serving.hierarchy import SubServerSync

pytestmark = pytest.mark.multiprocess

CLIENTS = 4
SIZE = 3000


def _vectors() -> tuple[list[torch.Tensor], list[float]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(SIZE, generator=gen) for _ in range(CLIENTS)], [16.0, 8.0, 24.0, 12.0]


class _DirectLink:
    """The two aggregation calls of ``ServerLink``, straight to a ``SecureRounds``."""

    def __init__(self, rounds: SecureRounds, client_id: int) -> None:
        self.rounds, self.client_id = rounds, client_id

    def aggregation_begin(self, round_index: int, fits_narrow: bool = False) -> WirePlan:
        plan = self.rounds.begin(self.client_id, round_index, fits_narrow).wait()
        return WirePlan(plan.attempt, list(plan.participants), plan.bits)

    def aggregation_upload(self, round_index: int, attempt: int, upload: torch.Tensor, weight: float) -> Any:
        result = self.rounds.upload(self.client_id, round_index, attempt, upload, weight).wait()
        plan = WirePlan(result.plan.attempt, list(result.plan.participants), result.plan.bits)
        return (result.average if result.status == "done" else None), plan


def _sub_server(index: int, port: int, keys: str, out: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size=2, is_master=index == 0, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=index, world_size=2, timeout=datetime.timedelta(seconds=60))
    sync = SubServerSync([], threading.RLock(), num_clients=CLIENTS, sync_every=1)
    rounds = SecureRounds(coordinator=sync)
    mine = [c for c in range(CLIENTS) if c % 2 == index]
    for client in mine:
        rounds.join(client)
    vectors, weights = _vectors()
    results: dict[str, Any] = {}

    def client(c: int) -> None:
        own = load_client_keys(keys, c, CLIENTS)
        callback = FedAvgCallback(_DirectLink(rounds, c), masker=PairwiseMasker(c, own.identity, own.peer_keys))
        # round 0: everyone uploads
        results[f"{c}/0"] = callback.average(vectors[c], weights[c]).tolist()
        callback._round = 1
        if c == 2:  # round 1: client 2 begins, learns the plan, and leaves without uploading
            rounds.begin(c, 1).wait()
            rounds.leave(c)
            return
        results[f"{c}/1"] = callback.average(vectors[c], weights[c]).tolist()
        results[f"{c}/redone"] = callback.redone_rounds

    threads = [threading.Thread(target=client, args=(c,)) for c in mine]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if any(t.is_alive() for t in threads):
        raise RuntimeError(f"sub-server {index}: a client is stuck")
    for c in mine:
        if c != 2:
            rounds.leave(c)
    sync.finish(timeout=60)
    results["completed"] = rounds.completed
    Path(out, f"{index}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_secure_rounds_span_sub_servers_and_redo_when_a_client_leaves(tmp_path: Path) -> None:
    generate_key_set(tmp_path / "keys", CLIENTS)
    context = mp.start_processes(
        _sub_server, args=(free_local_port(), str(tmp_path / "keys"), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise AssertionError("the sub-servers did not finish within 120 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()

    results = {**json.loads((tmp_path / "0.json").read_text()), **json.loads((tmp_path / "1.json").read_text())}
    vectors, weights = _vectors()
    everyone = fedavg(vectors, weights)
    without_2 = fedavg([vectors[i] for i in (0, 1, 3)], [weights[i] for i in (0, 1, 3)])
    for c in range(CLIENTS):
        torch.testing.assert_close(torch.tensor(results[f"{c}/0"]), everyone, atol=1e-5, rtol=0)
    for c in (0, 1, 3):
        torch.testing.assert_close(torch.tensor(results[f"{c}/1"]), without_2, atol=1e-5, rtol=0)
        assert results[f"{c}/redone"] == 1  # round 1 was planned with client 2, then redone without it
    assert json.loads((tmp_path / "0.json").read_text())["completed"] == 2
