"""FedAvg upload width: the same federation with 32-bit masked uploads (``crypto.narrow_uploads``,
the default) and with 64-bit ones, side by side.

    python benchmarks/uploads.py                       # SST-2, 2 clients, first 2000 rows, 1 epoch
    python benchmarks/uploads.py data.max_train_rows=12000 trainer.max_epochs=2   # parity.py's setting

Both runs: ``configs/sst2.yaml`` (FedAvg after every step, secure aggregation, encryption) with
the ``key=value`` overrides given, 2 clients under torchrun on loopback, the server in
``client_batching`` mode: it steps once per group of both clients' requests, so a run does not
depend on which client's request came first and two runs can be compared bit for bit (served one
request at a time, two identical 2-client runs already differ in the last bits). A round is narrow when
every participant's ``|weight * value|`` stays below ``2**7 / clients`` (masking.fits_narrow);
the weight is the samples a client trained on since the last round (32 here).

Prints the link's bytes each way, the uploads sent narrow, and whether the two runs' client blocks
and middle stack are equal bit for bit (they must be: the masks cancel modulo 2**32 as they do
modulo 2**64, and the sum fits). Last line: one JSON object with ``"bytes_in_ratio"`` (client ->
server bytes, narrow / wide) and ``"bit_identical"``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from flglm.benchmarking import find_data_dir
from flglm.crypto.keyring import generate_key_set
from flglm.jobs.subprocesses import run_federation
from flglm.tensor_files import load_tensors

CLIENTS = 2


def _run(config: Path, overrides: list[str], run_dir: Path, *, narrow: bool, timeout_s: float) -> dict:
    generate_key_set(run_dir / "keys", CLIENTS)
    run_federation(
        config,
        [f"crypto.key_dir={run_dir / 'keys'}", f"crypto.narrow_uploads={str(narrow).lower()}", *overrides],
        num_clients=CLIENTS,
        run_dir=run_dir,
        timeout_s=timeout_s,
    )
    return json.loads((run_dir / "summary.json").read_text())


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    found = {f"client{i}/{k}": v for i in range(CLIENTS) for k, v in load_tensors(run_dir / f"client{i}" / "client_blocks.safetensors").items()}
    middle = sorted(run_dir.glob("server*/middle*.safetensors"))
    for path in middle:
        found |= {f"{path.parent.name}/{k}": v for k, v in load_tensors(path).items()}
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="uploads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/sst2", help="directory with train.tsv and dev.tsv")
    parser.add_argument("--run-dir", default="runs/uploads", help="replaced by this run (a finished benchmark's output)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per federation")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for both runs")
    args = parser.parse_args(argv)
    data = find_data_dir(args.data, REPO_ROOT, ("train.tsv", "dev.tsv"), prog="uploads")
    overrides = [f"data.train_path={data / 'train.tsv'}", f"data.dev_path={data / 'dev.tsv'}", "data.max_train_rows=2000", "trainer.max_epochs=1"]
    overrides += ["server.parallelism=client_batching", "server.batch_window_ms=5000"]
    overrides += args.overrides
    root = Path(args.run_dir).resolve()
    if root.exists():
        shutil.rmtree(root)
    started = time.monotonic()
    summaries, weights = {}, {}
    for name, narrow in (("narrow", True), ("wide", False)):
        run_dir = root / name
        summaries[name] = _run(REPO_ROOT / "configs" / "sst2.yaml", overrides, run_dir, narrow=narrow, timeout_s=args.timeout)
        weights[name] = _weights(run_dir)
        print(f"{name}: done in {time.monotonic() - started:.0f} s", flush=True)
    same_names = sorted(weights["narrow"]) == sorted(weights["wide"]) and len(weights["narrow"]) > 0
    identical = same_names and all(torch.equal(weights["narrow"][k], weights["wide"][k]) for k in weights["wide"])
    print(f"\n{'uploads':<8} {'bytes in':>14} {'bytes out':>14} {'narrow uploads':>15} {'FedAvg rounds':>14} {'val_acc':>8}")
    row = {}
    for name, summary in summaries.items():
        link, client = summary["link"], summary["clients"]["0"]
        row[name] = link
        print(
            f"{name:<8} {link['wire_bytes_in']:>14,} {link['wire_bytes_out']:>14,} {int(client['narrow_uploads']):>15} "
            f"{int(client['fedavg_rounds']):>14} {summary['federation']['val_acc']:>8.4f}"
        )
    ratio_in = row["narrow"]["wire_bytes_in"] / row["wide"]["wire_bytes_in"]
    ratio_total = (row["narrow"]["wire_bytes_in"] + row["narrow"]["wire_bytes_out"]) / (row["wide"]["wire_bytes_in"] + row["wide"]["wire_bytes_out"])
    print(f"\nclient -> server bytes, narrow / wide: {ratio_in:.4f}; both ways: {ratio_total:.4f}")
    print(f"client blocks and middle stack bit for bit equal: {identical} ({len(weights['wide'])} tensors)")
    result = {
        "benchmark": "uploads",
        "clients": CLIENTS,
        "bytes_in_ratio": round(ratio_in, 4),
        "bytes_ratio": round(ratio_total, 4),
        "narrow_uploads": int(summaries["narrow"]["clients"]["0"]["narrow_uploads"]),
        "fedavg_rounds": int(summaries["narrow"]["clients"]["0"]["fedavg_rounds"]),
        "bit_identical": identical,
        "val_acc_narrow": summaries["narrow"]["federation"]["val_acc"],
        "val_acc_wide": summaries["wide"]["federation"]["val_acc"],
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
