"""The demo: a server and 2 clients fine-tune a tiny GLM, then the same model is trained
centralized on the same data, and the two are compared.

    python launch/demo.py            # what `make demo` runs
    python launch/demo.py trainer.max_epochs=5

Writes ``runs/demo/`` : generated data, the federation's logs, weights and summary.json,
the centralized run, ``comparison.json`` and ``loss_curves.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "demo.yaml"


def main(overrides: list[str]) -> int:
    from flglm.config import load_config
    from flglm.crypto.keyring import generate_key_set
    from flglm.data import write_demo_dataset
    from flglm.distributed import configure_threads
    from flglm.jobs.compare import compare_runs, write_comparison
    from flglm.jobs.subprocesses import run_federation
    from flglm.jobs.train import run_centralized

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

    print("\n== centralized: the whole model, all the data, one process ==", flush=True)
    configure_threads(1)
    central_cfg = load_config(CONFIG, [*overrides, f"run_dir={run_dir}"])
    run_centralized(central_cfg, out_dir=run_dir / "centralized")

    comparison = compare_runs([run_dir])  # what `flglm compare runs/demo` prints
    print("\n" + comparison.table() + "\n")
    print("\n".join(comparison.ratio_lines()))
    write_comparison(comparison, run_dir)
    print(f"details: {run_dir}/summary.json, {run_dir}/comparison.json, {run_dir}/loss_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
