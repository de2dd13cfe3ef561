"""Step time of split training over loopback RPC versus centralized training of the same model.

    python benchmarks/overhead.py                 # GLM, hidden 256, 6 layers, batch 16 x 64 tokens
    python benchmarks/overhead.py --steps 30 --warmup 5

It starts two processes under torchrun (1 thread each, as a federation on a 2-core machine
would run): rank 0 serves the middle stack, rank 1 times, interleaved, (a) a centralized
training step of the whole model in its own process and (b) a split training step whose
middle runs on the server over RPC. Both use the same weights, data, optimizer (AdamW) and
thread count. The last line is one JSON object; ``ratio`` = split / centralized.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from flglm.benchmarking import speed_model

MODEL = speed_model()


def _config():
    from flglm.config import ModelConfig, RunConfig

    cfg = RunConfig()
    cfg.model = ModelConfig(config=dict(MODEL))
    cfg.data.train_path = "unused"
    cfg.federation.num_clients = 1
    return cfg


def _worker(args: argparse.Namespace) -> None:
    import torch
    from torch.distributed import rpc

    from flglm.client.lm import FullCausalLM, SplitCausalLM
    from flglm.client.remote import RemoteMiddle
    from flglm.client.server_link import ServerLink
    from flglm.config import fingerprint
    from flglm.distributed import configure_threads, read_env, rpc_options
    from flglm.link import rpc_entries
    from flglm.models.split import ClientBlocks, build_full_model, plan_split
    from flglm.optim import build_optimizer
    from flglm.server import middle_server as server_mod
    from flglm.server.endpoint import ServerEndpoint

    env = read_env()
    configure_threads(env.local_world_size)
    cfg = _config()
    opts = rpc_options(num_worker_threads=8, timeout_s=300)
    if env.rank == 0:
        server = server_mod.MiddleServer(cfg)
        rpc_entries.install(ServerEndpoint(server))
        rpc.init_rpc("server", rank=0, world_size=2, rpc_backend_options=opts)
        server.wait_until_done(timeout=600)
        rpc.shutdown()
        return

    rpc.init_rpc("client0", rank=1, world_size=2, rpc_backend_options=opts)
    plan = plan_split(MODEL["num_hidden_layers"], client_head_layers=1, client_tail_layers=1)
    link = ServerLink(rpc.remote("server", rpc_entries.instance), client_id=0, timeout_s=300)
    info = link.hello(fingerprint(cfg), "bench")
    split = SplitCausalLM(ClientBlocks(cfg.model, plan), RemoteMiddle(link, server_info=info))
    full = FullCausalLM(build_full_model(cfg.model))
    split_opt = build_optimizer(split.parameters(), cfg.optim)
    full_opt = build_optimizer(full.parameters(), cfg.optim)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, MODEL["vocab_size"], (args.batch, args.seq), generator=gen)
    mask = torch.ones_like(ids)
    targets = torch.randint(4, MODEL["vocab_size"], (args.batch, args.seq), generator=gen)
    loss_fn = torch.nn.CrossEntropyLoss()

    def full_step() -> None:
        logits = full(ids, mask)
        loss_fn(logits.view(-1, logits.shape[-1]), targets.view(-1)).backward()
        full_opt.step()
        full_opt.zero_grad(set_to_none=True)

    step_index = [0]

    def split_step() -> None:
        logits = split(ids, mask)
        loss_fn(logits.view(-1, logits.shape[-1]), targets.view(-1)).backward()
        split_opt.step()
        split_opt.zero_grad(set_to_none=True)
        link.step(client_step=step_index[0], total_steps=10_000)
        step_index[0] += 1

    times: dict[str, list[float]] = {"centralized": [], "split": []}
    for i in range(args.warmup + args.steps):
        for name, fn in (("centralized", full_step), ("split", split_step)):
            started = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - started)
    link.leave({})
    rpc.shutdown()
    central = statistics.median(times["centralized"])
    split_t = statistics.median(times["split"])
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
    }
    print(f"centralized step: {central * 1000:.1f} ms (median of {args.steps})")
    print(f"split step over loopback RPC: {split_t * 1000:.1f} ms (median of {args.steps})")
    print(f"ratio split/centralized: {result['ratio']:.3f}")
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, "--worker"]
    cmd += [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--batch={args.batch}", f"--seq={args.seq}"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=Path(__file__).parent.parent)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        sys.exit(proc.returncode or 1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
