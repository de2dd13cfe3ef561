"""Soak: a 3-client federation trained for ``--minutes`` while its processes are killed at random.

    python benchmarks/soak.py                 # 10 minutes, a kill every 60-120 s
    python benchmarks/soak.py --minutes 3 --kill-every 20,40      # a quick try

What happens: a federation (1 server + ``--clients`` clients under torchrun on loopback,
encryption and secure aggregation on, sequential serving, FedAvg every 5 steps, a checkpoint
at every round, ``resume=true``) trains a tiny GLM on generated text for ``--steps`` steps per
client. Every ``--kill-every`` seconds (uniform in the range, seeded) a random client process
gets SIGKILL. torchrun then stops the whole federation (its agent ends every worker when one
fails), and the soak starts the same command again: every party resumes from the newest
checkpoint round all of them share. Kills stop at the deadline and the last run finishes.

Reported: restarts survived; optimizer steps completed (the server's count, restored from
checkpoints across restarts); lost steps = steps the clients made minus steps the server
applied (goal 0: none lost, none applied twice), and forwards vs backwards; the server's
resident memory at its first and last checkpoint of each run (the server process lives from
one restart to the next), the largest growth within one run and the growth over the last two
thirds of the longest run, after the allocator's warm-up (goal <= 10%); whether the run
finished within the time bound (the deadline + 10 minutes). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flglm.crypto.keyring import generate_key_set
from flglm.data import write_demo_dataset
from flglm.jobs.subprocesses import TRAIN_SCRIPT, kill_tree
from flglm.run_layout import server_memory_path

MODEL = {
    "model_type": "glm",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def write_config(root: Path, clients: int, steps: int) -> Path:
    train, dev = write_demo_dataset(root / "data", train_rows=clients * steps * 8, dev_rows=32, seed=1)
    generate_key_set(root / "keys", num_clients=clients)
    cfg = {
        "seed": 0,
        "run_dir": str(root / "run"),
        "resume": True,
        "model": {"config": MODEL},
        "optim": {"name": "adamw", "lr": 0.003, "scheduler": "linear", "warmup_steps": 10},
        "data": {"train_path": str(train), "dev_path": str(dev), "max_length": 32, "batch_size": 8, "eval_batch_size": 32, "tokenizer_vocab_size": 512},
        "federation": {"num_clients": clients, "aggregate_every": 5, "retry_backoff_s": 0.2},
        "server": {"checkpoint_every": 1, "parallelism": "sequential"},
        "crypto": {"key_dir": str(root / "keys")},
        "trainer": {"max_epochs": 100, "max_steps": steps, "enable_progress_bar": False, "limit_val_batches": 0, "num_sanity_val_steps": 0},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def client_pids(torchrun: subprocess.Popen) -> list[int]:
    """The client processes of a running federation (ranks >= 1)."""
    pids = []
    for child in psutil.Process(torchrun.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and rank != "0" and "train.py" in " ".join(child.cmdline()):
            pids.append(child.pid)
    return pids


def run_once(config: Path, clients: int, *, kill_after: float | None, log: Path, rng: random.Random, give_up_at: float) -> tuple[int, bool]:
    """One start of the federation; SIGKILL a random client after ``kill_after`` s. (exit code, killed);
    past ``give_up_at`` (monotonic) the federation is stopped and reported unfinished."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={clients + 1}", str(TRAIN_SCRIPT), "--config", str(config)]
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        killed = False
        started = time.monotonic()
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                if time.monotonic() > give_up_at:
                    print("  time bound reached: stopping the federation", flush=True)
                    kill_tree(proc.pid)
                    return proc.wait(), False
                if kill_after is not None and not killed and time.monotonic() - started > kill_after:
                    pids = client_pids(proc)
                    if pids:
                        victim = rng.choice(pids)
                        print(f"  SIGKILL client pid {victim} after {time.monotonic() - started:.0f}s", flush=True)
                        os.kill(victim, signal.SIGKILL)
                        killed = True
            return proc.wait(), killed
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)


def memory_segments(memory_log: Path) -> list[list[tuple[int, float]]]:
    """(server steps, rss MB) at each checkpoint, one list per server process (the server's ``memory.jsonl``)."""
    by_process: dict[int, list[tuple[int, float]]] = {}
    for line in memory_log.read_text().splitlines() if memory_log.is_file() else []:
        row = json.loads(line)
        by_process.setdefault(int(row["pid"]), []).append((int(row["steps"]), float(row["rss_mb"])))
    return [s for s in by_process.values() if s]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6000, help="optimizer steps per client (4400 took 7.1 minutes here)")
    parser.add_argument("--kill-every", default="60,120", help="seconds between kills: MIN,MAX")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default=str(REPO / "runs" / "soak"))
    args = parser.parse_args()
    low, high = (float(x) for x in args.kill_every.split(","))
    root = Path(args.root)
    if root.exists():
        subprocess.run(["rm", "-rf", str(root)], check=True)
    root.mkdir(parents=True)
    config = write_config(root, args.clients, args.steps)
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.minutes * 60
    restarts, runs, finished = 0, 0, False
    started = time.monotonic()
    while True:  # kills stop before the deadline; the last run finishes after it (at most 10 more minutes)
        remaining = deadline - time.monotonic()
        kill_after = rng.uniform(low, high) if remaining > high else None
        runs += 1
        plan = f"kill after {kill_after:.0f}s" if kill_after else "no kill (deadline near)"
        print(f"run {runs}: {plan}", flush=True)
        code, killed = run_once(
            config, args.clients, kill_after=kill_after, log=root / "torchrun.log", rng=rng, give_up_at=deadline + 600
        )
        if code == 0:
            finished = True
            break
        if time.monotonic() > deadline + 600:
            break
        if not killed:
            raise SystemExit(f"the federation failed without a kill (exit {code}); see {root / 'torchrun.log'} and {root / 'run' / 'logs'}")
        restarts += 1
        if kill_after is None:
            break
    elapsed = time.monotonic() - started
    run_dir = root / "run"
    summary = json.loads((run_dir / "summary.json").read_text()) if finished else {}
    server = summary.get("server", {})
    client_steps = sum(
        int(json.loads((run_dir / f"client{i}" / "metrics.json").read_text())["metrics"]["steps"]) for i in range(args.clients)
    ) if finished else None
    segments = memory_segments(server_memory_path(run_dir))
    growth = max((s[-1][1] / s[0][1] - 1.0 for s in segments if len(s) > 1), default=float("nan"))
    longest = max(segments, key=lambda s: s[-1][0] - s[0][0]) if segments else []
    result = {
        "minutes": round(elapsed / 60, 2),
        "clients": args.clients,
        "finished": finished,
        "restarts": restarts,
        "steps_completed": server.get("steps"),
        "client_steps": client_steps,
        "lost_steps": (client_steps - server["steps"]) if finished else None,
        "forwards": server.get("forwards"),
        "backwards": server.get("backwards"),
        "aggregation_rounds": server.get("aggregation_rounds"),
        "server_rss_mb_first": segments[0][0][1] if segments else None,
        "server_rss_mb_last": segments[-1][-1][1] if segments else None,
        "longest_server_life_steps": (longest[-1][0] - longest[0][0]) if longest else None,
        "longest_server_life_rss_mb": [longest[0][1], longest[-1][1]] if longest else None,
        "max_rss_growth_within_a_run": round(growth, 4),
        "rss_growth_after_warmup": round(longest[-1][1] / longest[len(longest) // 3][1] - 1.0, 4) if len(longest) > 2 else None,
    }
    print(f"restarts survived: {restarts}; steps: server {result['steps_completed']}, clients {client_steps}; lost: {result['lost_steps']}")
    print(f"server RSS: first {result['server_rss_mb_first']} MB, last {result['server_rss_mb_last']} MB; largest growth within one server run {growth:.1%}")
    print(f"longest server run: {result['longest_server_life_steps']} steps, RSS {result['longest_server_life_rss_mb']} MB; "
          f"growth over its last two thirds (after warm-up): {result['rss_growth_after_warmup']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
