"""The demo: a server and 2 clients fine-tune a tiny GLM, then the same model is trained
centralized on the same data, and the two are compared.

    python launch/demo.py            # what `make demo` runs
    python launch/demo.py trainer.max_epochs=5

Writes ``runs/demo/`` : generated data, the federation's logs, weights and summary.json,
the centralized run, ``comparison.json`` and ``loss_curves.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "demo.yaml"


def main(overrides: list[str]) -> int:
    from flglm.config import load_config
    from flglm.crypto.keyring import generate_key_set
    from flglm.data import write_demo_dataset
    from flglm.distributed import configure_threads
    from flglm.jobs.subprocesses import run_federation
    from flglm.jobs.train import run_centralized
    from flglm.tensor_files import write_json

    cfg = load_config(CONFIG, overrides)
    run_dir = Path(cfg.run_dir)
    train, dev = Path(cfg.data.train_path), Path(cfg.data.dev_path or "")
    if not train.is_file() or not dev.is_file():
        write_demo_dataset(train.parent, train_rows=2000, dev_rows=400, seed=0)
        print(f"wrote the demo dataset to {train.parent}")

    n = cfg.federation.num_clients
    if cfg.crypto.enabled:
        # A real federation creates each party's key where it runs (flglm keygen --out ...) and
        # shares only the .pub files; the demo runs every party here, so it makes the whole set.
        written = generate_key_set(cfg.crypto.key_dir, n)
        if written:
            print(f"wrote identity keys for the server and {n} clients to {cfg.crypto.key_dir}")
    print(f"\n== federated: 1 server + {n} clients on loopback, encryption {'on' if cfg.crypto.enabled else 'off'} ==", flush=True)
    run_federation(CONFIG, overrides, num_clients=n, run_dir=run_dir, timeout_s=1800, stream=True)
    federated = json.loads((run_dir / "summary.json").read_text())

    print("\n== centralized: the whole model, all the data, one process ==", flush=True)
    configure_threads(1)
    central_cfg = load_config(CONFIG, [*overrides, f"run_dir={run_dir}"])
    central = run_centralized(central_cfg, out_dir=run_dir / "centralized")

    rows = {"federated": federated["federation"], "centralized": central}
    keys = [k for k in ("val_acc", "val_f1", "val_loss", "train_time_s") if k in central]
    print("\n" + f"{'':12}" + "".join(f"{k:>14}" for k in keys))
    for name, metrics in rows.items():
        print(f"{name:12}" + "".join(f"{metrics.get(k, float('nan')):>14.4f}" for k in keys))
    ratio = rows["federated"]["val_acc"] / max(central["val_acc"], 1e-9)
    print(f"\nfederated / centralized dev accuracy: {ratio:.3f}")
    write_json({"federated": rows["federated"], "centralized": central, "ratio": ratio}, run_dir / "comparison.json")
    _plot(run_dir, n, cfg.trainer.max_epochs)
    print(f"details: {run_dir}/summary.json, {run_dir}/comparison.json, {run_dir}/loss_curves.png")
    return 0


def _plot(run_dir: Path, num_clients: int, epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    runs = [(f"client {i} (federated)", run_dir / f"client{i}") for i in range(num_clients)]
    runs.append(("centralized", run_dir / "centralized"))
    for label, folder in runs:
        losses = json.loads((folder / "metrics.json").read_text())["losses"]
        epoch = [epochs * (i + 1) / len(losses) for i in range(len(losses))]
        ax.plot(epoch, _smooth(losses), label=label, alpha=0.8, color="black" if label == "centralized" else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (moving average of 10)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss_curves.png", dpi=100)


def _smooth(values: list[float], k: int = 10) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-k:]
        out.append(sum(acc) / len(acc))
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
