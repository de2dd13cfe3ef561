"""Server parallelism: training throughput of a federation for 1, 2 and 4 clients, per server mode.

    python benchmarks/parallel.py                                   # ~5-10 min on a 2-core machine
    python benchmarks/parallel.py --steps 6 --clients 1,2           # a quick try
    python benchmarks/parallel.py --plot /tmp/p.png trainer.precision=bf16-mixed   # overrides for every run

What is measured: samples per second trained by the whole federation, for each client count
(``--clients``, default 1,2,4) in each server mode (``server.parallelism=sequential``:
one client's step at a time; ``client_batching``: the requests of a group of clients run as
one batch; ``hierarchical``: ``min(--sub-servers, clients)`` sub-server processes, each with its
own replica of the middle stack serving its own clients, synchronised at the FedAvg round),
and centralized training of the same model on the same data for reference.

How:

* Workload (the model of ``benchmarks/overhead.py``, so the server's middle stack is most of
  the work): GLM (random init) hidden 256, intermediate 1024, 6 blocks split 1 + 4 + 1,
  8 heads, 2 KV heads, head_dim 32, vocabulary 2000 (word-level tokenizer of 2000 words
  trained on the training rows); SST-2 prompt + verbalizer classification, phrases
  truncated to 64 tokens (each batch padded to its longest row), batch 16, AdamW. Every
  client trains exactly ``--steps`` optimizer steps, so every mode does the same work per
  client and a federation of N clients trains N x steps x 16 samples. The rows are the first
  ``max(clients) x steps x 16`` of ``--data``/train.tsv for every run (IID split), so the
  tokenizer is the same everywhere and the 4-client partitions hold exactly ``steps``
  batches each.
* Federations: ``flglm.jobs.subprocesses.run_federation`` (1 server + N clients under torchrun on
  loopback, one thread per process as ``flglm.distributed.configure_threads`` gives on two
  cores), encryption ON (AES-256-GCM per client, keys from ``generate_key_set``), secure
  aggregation on, ``federation.aggregate_every=0``: the only FedAvg is one round at the end of
  training (the steps end mid-epoch or at the first epoch end), so aggregation is not what
  is measured. ``server.batch_window_ms`` is ``--batch-window-ms``.
* Centralized: ``flglm.jobs.train.run_centralized`` in a child process with one thread, on the
  same rows, ``max(clients) x steps`` steps of batch 16 (one pass over the rows).
* Timing: each client's ``train_time_s`` (``flglm/jobs/train.py``) is the wall time of its
  ``trainer.fit`` (encryption handshake, every training step, the final FedAvg round) plus
  the final metrics pass; no dev file is given, so there is no validation anywhere
  (``trainer.limit_val_batches=0`` too). Process start-up, imports, tokenizer training and
  joining the federation are not timed. Throughput of a federation = the samples all clients
  trained / the slowest client's ``train_time_s``; centralized = its samples / its
  ``train_time_s``. ``wall s`` in the table is the whole run, start-up included, and
  ``cores busy`` = CPU seconds of all the run's processes / that wall time.

Runs go under ``runs/parallel/`` (``--run-dir``), one directory each, with their logs and
``summary.json``. stdout is a table, the speedup and its goal, and as its last line one JSON
object with every figure; ``speedup`` = client_batching / sequential throughput at the largest
client count (4 by default; goal >= 1.5), ``hierarchical_speedup`` the same for hierarchical.
The plot (``--plot``) shows throughput against
the number of clients, one line per mode, centralized as a horizontal line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from flglm.benchmarking import centralized_worker, client_counts, find_data_dir, run_centralized_child, speed_model

REPO_ROOT = Path(__file__).resolve().parent.parent
MODES = ("sequential", "client_batching", "hierarchical")
GOAL = 1.5
BATCH = 16

MODEL = speed_model()


def _config(*, train_path: Path, rows: int, steps: int, window_ms: float) -> dict[str, Any]:
    """The workload every run shares (written to ``run_dir/parallel.yaml``)."""
    return {
        "seed": 0,
        "model": {"config": dict(MODEL)},
        "split": {"client_head_layers": 1, "client_tail_layers": 1},
        "optim": {"name": "adamw", "lr": 1e-3, "scheduler": "constant"},
        "server": {"parallelism": "sequential", "batch_window_ms": window_ms},
        "federation": {"num_clients": 1, "aggregate_every": 0},
        "data": {
            "train_path": str(train_path),
            "partition": "iid",
            "max_train_rows": rows,
            "max_length": 64,
            "batch_size": BATCH,
            "tokenizer_vocab_size": MODEL["vocab_size"],
        },
        "task": {"kind": "classification", "prompt": "{text} sentiment :", "label_words": ["bad", "good"]},
        "trainer": {
            "max_epochs": 1,
            "max_steps": steps,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 10,
            "enable_progress_bar": False,
        },
    }





def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_centralized(config: Path, overrides: list[str], run_dir: Path, timeout_s: float) -> dict[str, float]:
    metrics = run_centralized_child(__file__, config, overrides, run_dir, timeout_s=timeout_s, prog="parallel")
    return {"samples": metrics["samples"], "steps": metrics["steps"], "train_time_s": metrics["train_time_s"]}


def _run_federated(
    config: Path, overrides: list[str], *, mode: str, clients: int, sub_servers: int, run_dir: Path, timeout_s: float
) -> dict[str, Any]:
    from flglm.crypto.keyring import generate_key_set
    from flglm.jobs.subprocesses import FederationFailed, run_federation

    generate_key_set(run_dir / "keys", clients)
    mode_overrides = [f"server.parallelism={mode}"]
    try:
        run_federation(
            config,
            [f"crypto.key_dir={run_dir / 'keys'}", *mode_overrides, *overrides],
            num_clients=clients,
            sub_servers=sub_servers if mode == "hierarchical" else 1,
            run_dir=run_dir,
            timeout_s=timeout_s,
        )
    except FederationFailed as err:
        raise SystemExit(f"parallel: error: the {mode} federation with {clients} client(s) failed:\n{err}") from None
    summary = json.loads((run_dir / "summary.json").read_text())
    per_client = summary["clients"]
    if len(per_client) != clients:
        raise SystemExit(f"parallel: error: {run_dir}/summary.json reports {len(per_client)} clients, expected {clients}")
    server = summary["server"]
    out: dict[str, Any] = {
        "samples": sum(m["samples"] for m in per_client.values()),
        "steps": sum(m["steps"] for m in per_client.values()),
        # The clients train concurrently: the federation's training time is the slowest client's.
        "train_time_s": max(m["train_time_s"] for m in per_client.values()),
        "fastest_client_s": min(m["train_time_s"] for m in per_client.values()),
        "server_steps": server["steps"],
        "server_forwards": server["forwards"],
    }
    for key in ("groups", "mean_group_size", "dropped_members"):
        if key in server:
            out[key] = server[key]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/sst2", help="directory with train.tsv (header label<TAB>sentence)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of every client (default 30)")
    parser.add_argument("--clients", default="1,2,4", help="comma-separated client counts (default 1,2,4)")
    parser.add_argument("--batch-window-ms", type=float, default=20.0, help="server.batch_window_ms for client_batching")
    parser.add_argument("--sub-servers", type=int, default=2, help="hierarchical: sub-server processes (at most one per client)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated modes to run (default {','.join(MODES)})")
    parser.add_argument("--plot", default=str(REPO_ROOT / "benchmarks" / "figures" / "parallel.png"), help="where to write the PNG plot")
    parser.add_argument("--run-dir", default=str(REPO_ROOT / "runs" / "parallel"))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed for each run")
    parser.add_argument("--centralized-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args()
    if args.centralized_worker:
        centralized_worker(args.config, args.overrides)
        return

    started = time.monotonic()
    clients = client_counts(args.clients, prog="parallel")
    if args.steps < 1:
        raise SystemExit(f"parallel: error: --steps must be >= 1, got {args.steps}")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        raise SystemExit(f"parallel: error: --modes must be among {list(MODES)}, got {args.modes!r}")
    if args.sub_servers < 1:
        raise SystemExit(f"parallel: error: --sub-servers must be >= 1, got {args.sub_servers}")
    reserved = [
        o
        for o in args.overrides
        if o.split("=", 1)[0] in ("run_dir", "federation.num_clients", "server.parallelism", "server.sub_servers", "trainer.max_steps")
    ]
    if reserved:
        raise SystemExit(f"parallel: error: {reserved}: set these with --run-dir, --clients and --steps (the modes are all run)")
    train_path = find_data_dir(args.data, REPO_ROOT, ("train.tsv",), prog="parallel") / "train.tsv"
    root = Path(args.run_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    most = max(clients)
    rows = most * args.steps * BATCH
    config = root / "parallel.yaml"
    config.write_text(yaml.safe_dump(_config(train_path=train_path, rows=rows, steps=args.steps, window_ms=args.batch_window_ms), sort_keys=False))

    from flglm.config import ConfigError, load_config

    try:
        cfg = load_config(config, [*args.overrides, f"federation.num_clients={most}"])
    except ConfigError as err:
        raise SystemExit(f"parallel: error: {err}") from None
    from flglm.data.loading import all_train_examples

    available = len(all_train_examples(cfg))
    if available < rows:
        raise SystemExit(f"parallel: error: {train_path} has {available} usable rows, {most} clients x {args.steps} steps x {BATCH} need {rows}")

    plan: list[tuple[str, str, int]] = [("centralized", "centralized", 1)]
    # The modes of one client count run back to back, so machine drift hits them alike.
    plan += [(f"{mode}_{n}", mode, n) for n in clients for mode in MODES if mode in modes]
    results: dict[str, dict[str, Any]] = {}
    for name, mode, n in plan:
        run_dir = root / name
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"[parallel] {name}: running ...", file=sys.stderr, flush=True)
        t0, cpu0 = time.monotonic(), _children_cpu_s()
        if mode == "centralized":
            # One pass over the rows the largest federation trains on, in the same batches of 16.
            overrides = [*args.overrides, f"federation.num_clients={most}", f"trainer.max_steps={most * args.steps}"]
            result: dict[str, Any] = _run_centralized(config, overrides, run_dir, args.timeout)
        else:
            sub_servers = min(args.sub_servers, n)
            result = _run_federated(
                config, args.overrides, mode=mode, clients=n, sub_servers=sub_servers, run_dir=run_dir, timeout_s=args.timeout
            )
            result["sub_servers"] = sub_servers if mode == "hierarchical" else 1
            expected = n * args.steps
            if result["steps"] != expected or result["samples"] != expected * BATCH:
                raise SystemExit(
                    f"parallel: error: {name} trained {result['steps']:.0f} steps / {result['samples']:.0f} samples, expected {expected} / {expected * BATCH}"
                )
        result["wall_s"] = time.monotonic() - t0
        result["cpu_s"] = _children_cpu_s() - cpu0
        result["clients"] = n
        result["mode"] = mode
        result["samples_per_s"] = result["samples"] / result["train_time_s"]
        results[name] = result
        print(f"[parallel] {name}: {result['samples_per_s']:.1f} samples/s in {result['wall_s']:.0f}s", file=sys.stderr, flush=True)

    def over_sequential(mode: str) -> float | None:
        if f"sequential_{most}" in results and f"{mode}_{most}" in results:
            return results[f"{mode}_{most}"]["samples_per_s"] / results[f"sequential_{most}"]["samples_per_s"]
        return None

    speedup, hierarchical_speedup = over_sequential("client_batching"), over_sequential("hierarchical")
    print("\n".join(_table(results, steps=args.steps, rows=rows, window_ms=args.batch_window_ms)))
    plot = Path(args.plot).resolve()
    _plot(results, clients, plot)
    print(f"plot: {plot}")
    if speedup is not None:
        verdict = "met" if speedup >= GOAL else "NOT met"
        print(f"speedup client_batching / sequential at {most} clients: {speedup:.3f} (goal >= {GOAL}: {verdict})")
    if hierarchical_speedup is not None:
        print(f"speedup hierarchical / sequential at {most} clients: {hierarchical_speedup:.3f}")
    out: dict[str, Any] = {
        "benchmark": "parallel",
        "steps_per_client": args.steps,
        "batch": BATCH,
        "train_rows": rows,
        "clients": clients,
        "batch_window_ms": args.batch_window_ms,
        "sub_servers": args.sub_servers,
        "encryption": True,
        "overrides": args.overrides,
    }
    for name, r in results.items():
        out[f"{name}_samples_per_s"] = round(r["samples_per_s"], 2)
        out[f"{name}_train_s"] = round(r["train_time_s"], 2)
        out[f"{name}_cores_busy"] = round(r["cpu_s"] / r["wall_s"], 2)
        if "mean_group_size" in r:
            out[f"{name}_mean_group_size"] = r["mean_group_size"]
            out[f"{name}_groups"] = r["groups"]
            out[f"{name}_dropped_members"] = r["dropped_members"]
    out["hierarchical_speedup"] = round(hierarchical_speedup, 3) if hierarchical_speedup is not None else None
    out["speedup"] = round(speedup, 3) if speedup is not None else None
    out["speedup_at_clients"] = most
    out["goal"] = f"speedup >= {GOAL}"
    out["goal_met"] = speedup is not None and speedup >= GOAL
    out["plot"] = str(plot)
    out["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(out))


def _table(results: dict[str, dict[str, Any]], *, steps: int, rows: int, window_ms: float) -> list[str]:
    central = results["centralized"]["samples_per_s"]
    header = f"{'mode':<17}{'clients':>8}{'servers':>8}{'samples':>9}{'train s':>9}{'samples/s':>11}{'/ central':>10}{'group':>7}{'wall s':>8}{'cores busy':>11}"
    setup = (
        f"Server parallelism: GLM hidden 256, 6 blocks (1 + 4 + 1), vocab 2000, SST-2 ({rows} rows), batch {BATCH}, "
        f"{steps} steps per client, encryption on, FedAvg once at the end, batch window {window_ms:g} ms"
    )
    lines = [
        setup,
        header,
        "-" * len(header),
    ]
    for r in results.values():
        group = f"{r['mean_group_size']:.2f}" if "mean_group_size" in r else "-"
        lines.append(
            f"{r['mode']:<17}{r['clients']:>8}{r.get('sub_servers', 1):>8}{r['samples']:>9.0f}{r['train_time_s']:>9.1f}{r['samples_per_s']:>11.1f}"
            f"{r['samples_per_s'] / central:>10.2f}{group:>7}{r['wall_s']:>8.0f}{r['cpu_s'] / r['wall_s']:>11.2f}"
        )
    lines.append(
        "train s: slowest client's trainer.fit (no validation); samples/s: all clients' samples / train s; "
        "servers: server processes; group: mean clients per server batch; wall s, cores busy: the whole run, start-up included"
    )
    return lines


def _plot(results: dict[str, dict[str, Any]], clients: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in MODES:
        points = [(n, results[f"{mode}_{n}"]["samples_per_s"]) for n in clients if f"{mode}_{n}" in results]
        ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=mode)
        for n, v in points:  # show whether batching happened: mean clients per server batch
            group = results[f"{mode}_{n}"].get("mean_group_size")
            if group is not None:
                ax.annotate(f"group {group:.2f}", (n, v), textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
    central = results["centralized"]["samples_per_s"]
    ax.axhline(central, color="black", linestyle="--", label="centralized (1 process)")
    ax.set_xticks(clients)
    ax.set_xlabel("clients")
    ax.set_ylabel("training throughput of the federation (samples/s)")
    ax.set_ylim(0, 1.15 * max(central, *(r["samples_per_s"] for r in results.values())))
    ax.set_title("Server parallelism (2 CPU cores, encryption on)")
    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
