"""``server.sync_step``: a synchronisation of the sub-servers' middle stacks moves every replica
from the last synchronised weights by ``sync_step`` times the sample-weighted mean change
(1: plain averaging). Two real sub-server processes joined by a gloo group."""

from __future__ import annotations

import datetime
import json
import socket
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flglm.server.serving.hierarchy import SubServerSync

pytestmark = pytest.mark.multiprocess

CHANGES = [torch.tensor([1.0, -2.0, 4.0]), torch.tensor([3.0, 2.0, 0.0])]
SAMPLES = [10, 30]
ANCHOR = torch.tensor([0.5, 0.5, 0.5])


def _sub_server(index: int, port: int, step: float, out: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size=2, is_master=index == 0, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=index, world_size=2, timeout=datetime.timedelta(seconds=60))
    param = torch.nn.Parameter(ANCHOR.clone())
    sync = SubServerSync([param], threading.RLock(), num_clients=2, sync_every=1, sync_step=step)
    with torch.no_grad():
        param.add_(CHANGES[index])  # this replica's training since the last synchronisation
    sync.add_samples(SAMPLES[index])
    sync.finish(timeout=60)  # the final synchronisation
    Path(out).write_text(json.dumps(param.detach().tolist()))
    dist.destroy_process_group()


@pytest.mark.parametrize("step", [1.0, 2.0])
def test_sync_step_scales_the_mean_change_of_the_replicas(tmp_path: Path, step: float) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outs = [str(tmp_path / f"replica{i}.json") for i in range(2)]

    processes = [mp.get_context("spawn").Process(target=_sub_server, args=(i, port, step, outs[i])) for i in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=90)
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive and all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]

    mean_change = (CHANGES[0] * SAMPLES[0] + CHANGES[1] * SAMPLES[1]) / sum(SAMPLES)
    expected = ANCHOR + step * mean_change
    for out in outs:
        assert torch.allclose(torch.tensor(json.loads(Path(out).read_text())), expected, atol=1e-6)
