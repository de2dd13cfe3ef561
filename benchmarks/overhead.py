"""Step time of split training over loopback RPC, and over the socket link, versus centralized training.

    python benchmarks/overhead.py                 # GLM, hidden 256, 6 layers, batch 16 x 64 tokens
    python benchmarks/overhead.py --steps 30 --warmup 5

It starts two processes under torchrun (1 thread each, as a federation on a 2-core machine
would run): rank 0 serves the middle stack (over RPC and on an edge, :mod:`flglm.server.edge`),
rank 1 times, interleaved, (a) a centralized training step of the whole model in its own
process, (b) a split training step whose middle runs on the server over RPC (client 0) and
(c) the same over the socket link (client 1, :class:`flglm.link.socket_transport.SocketTransport`).
All use the same data, optimizer (AdamW) and thread count. The last line is one JSON object;
``ratio`` = split over RPC / centralized, ``socket_over_rpc`` = socket step / RPC step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from flglm.benchmarking import speed_batch, speed_model

MODEL = speed_model()


def _config():
    from flglm.config import ModelConfig, RunConfig

    cfg = RunConfig()
    cfg.model = ModelConfig(config=dict(MODEL))
    cfg.data.train_path = "unused"
    cfg.federation.num_clients = 2
    return cfg


def _worker(args: argparse.Namespace) -> None:
    import torch
    from torch.distributed import rpc

    from flglm.client.lm import FullCausalLM, SplitCausalLM
    from flglm.client.remote import RemoteMiddle
    from flglm.client.server_link import ServerLink
    from flglm.config import fingerprint
    from flglm.distributed import configure_threads, read_env, rpc_options
    from flglm.link import rpc_allowlist, rpc_entries
    from flglm.link.socket_transport import SocketTransport
    from flglm.models.split import ClientBlocks, build_full_model, plan_split
    from flglm.optim import build_optimizer
    from flglm.server import middle_server as server_mod
    from flglm.server.endpoint import ServerEndpoint

    env = read_env()
    configure_threads(env.local_world_size)
    cfg = _config()
    opts = rpc_options(num_worker_threads=8, timeout_s=300)
    rpc_allowlist.install()  # as every flglm process of the rpc mode does (flglm.distributed.rpc_worker)
    edge_file = Path(args.edge_file)
    if env.rank == 0:
        from flglm.server.edge import Edge

        server = server_mod.MiddleServer(cfg)
        endpoint = ServerEndpoint(server)
        rpc_entries.install(endpoint)
        edge = Edge(
            endpoint, host="127.0.0.1", port=0, encrypted=False, max_frame_bytes=1 << 30, first_frame_timeout_s=10,
            call_timeout_s=300, max_connections=8, max_connections_per_client=2,
        )  # fmt: skip
        host, port = edge.start()
        edge_file.write_text(f"{host}:{port}")
        rpc.init_rpc("server", rank=0, world_size=2, rpc_backend_options=opts)
        server.wait_until_done(timeout=600)
        edge.close()
        rpc.shutdown()
        return

    rpc.init_rpc("client0", rank=1, world_size=2, rpc_backend_options=opts)
    plan = plan_split(MODEL["num_hidden_layers"], client_head_layers=1, client_tail_layers=1)
    link = ServerLink(rpc.remote("server", rpc_entries.instance), client_id=0, timeout_s=300)
    info = link.hello(fingerprint(cfg), "bench")
    split = SplitCausalLM(ClientBlocks(cfg.model, plan), RemoteMiddle(link, server_info=info))
    while not edge_file.is_file():
        time.sleep(0.05)
    host, port = edge_file.read_text().rsplit(":", 1)
    socket_link = ServerLink(SocketTransport(host, int(port), timeout_s=300, max_frame_bytes=1 << 30), client_id=1, timeout_s=300)
    socket_split = SplitCausalLM(ClientBlocks(cfg.model, plan), RemoteMiddle(socket_link, server_info=socket_link.hello(fingerprint(cfg), "bench")))
    full = FullCausalLM(build_full_model(cfg.model))
    split_opt = build_optimizer(split.parameters(), cfg.optim)
    socket_opt = build_optimizer(socket_split.parameters(), cfg.optim)
    full_opt = build_optimizer(full.parameters(), cfg.optim)

    ids, mask, targets = speed_batch(args.batch, args.seq)
    loss_fn = torch.nn.CrossEntropyLoss()

    def full_step() -> None:
        logits = full(ids, mask)
        loss_fn(logits.view(-1, logits.shape[-1]), targets.view(-1)).backward()
        full_opt.step()
        full_opt.zero_grad(set_to_none=True)

    def split_step_of(model: SplitCausalLM, optimizer: torch.optim.Optimizer, link: ServerLink) -> Callable[[], None]:
        step_index = [0]

        def split_step() -> None:
            logits = model(ids, mask)
            loss_fn(logits.view(-1, logits.shape[-1]), targets.view(-1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            link.step(client_step=step_index[0], total_steps=10_000)
            step_index[0] += 1

        return split_step

    steps = (("centralized", full_step), ("split", split_step_of(split, split_opt, link)), ("socket", split_step_of(socket_split, socket_opt, socket_link)))
    times: dict[str, list[float]] = {name: [] for name, _ in steps}
    for i in range(args.warmup + args.steps):
        # Alternate which link goes first, so neither always runs right after the centralized step.
        for name, fn in (steps if i % 2 else (steps[0], steps[2], steps[1])):
            started = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - started)
    link.leave({})
    socket_link.leave({})
    rpc.shutdown()
    central = statistics.median(times["centralized"])
    split_t = statistics.median(times["split"])
    socket_t = statistics.median(times["socket"])
    crossing_mb = args.batch * args.seq * MODEL["hidden_size"] * 4 / 1e6
    result = {
        "benchmark": "overhead",
        "model": "glm hidden 256, 6 layers (1 + 4 + 1)",
        "batch": args.batch,
        "seq": args.seq,
        "threads_per_process": torch.get_num_threads(),
        "steps_timed": args.steps,
        "centralized_step_s": round(central, 4),
        "split_step_s": round(split_t, 4),
        "crossing_mb": round(crossing_mb, 3),
        "ratio": round(split_t / central, 4),
        "socket_step_s": round(socket_t, 4),
        "socket_over_rpc": round(socket_t / split_t, 4),
    }
    print(f"centralized step: {central * 1000:.1f} ms (median of {args.steps})")
    print(f"split step over loopback RPC: {split_t * 1000:.1f} ms (median of {args.steps})")
    print(f"split step over the socket link: {socket_t * 1000:.1f} ms (median of {args.steps})")
    print(f"ratio split/centralized: {result['ratio']:.3f}; socket link / torch RPC: {result['socket_over_rpc']:.3f}")
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--edge-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, "--worker"]
    edge_file = Path(tempfile.mkdtemp(prefix="flglm-overhead-")) / "edge"
    cmd += [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--batch={args.batch}", f"--seq={args.seq}", f"--edge-file={edge_file}"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=Path(__file__).parent.parent)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        sys.exit(proc.returncode or 1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
