"""Accuracy parity: the same small GLM trained centralized and federated (2 and 4 clients) on SST-2.

    python benchmarks/parity.py --data ../shared/data/sst2
    python benchmarks/parity.py --data ../shared/data/sst2 trainer.max_epochs=3   # overrides for every run
    python benchmarks/parity.py --data ../shared/data/sst2 --clients 2 data.max_train_rows=2000
    python benchmarks/parity.py --data ../shared/data/sst2 --sub-servers 2
    python benchmarks/parity.py --data ../shared/data/sst2 --pretrain-base peft.method=lora
    python benchmarks/parity.py --data ../shared/data/sst2 --pretrain-base --pretrain-verdicts terrible,great \
        --global-batch peft.method=ptuning_v2 optim.name=sgd optim.momentum=0.9 optim.lr=5 trainer.max_epochs=6

With ``configs/sst2.yaml`` (the first 12000 training phrases, 2 epochs) the three runs take
about 6.5 minutes on a 2-core CPU machine; centralized dev accuracy is ~0.79.

``--data`` is a directory with ``train.tsv`` and ``dev.tsv`` (header ``label<TAB>sentence``).
Every run uses ``configs/sst2.yaml`` (a GLM with random init; the word-level tokenizer is
trained from the training text) with the same seed, epochs, batch size and optimizer, plus
the ``key=value`` overrides given after the flags, which are passed to every run unchanged.

* Centralized: ``flglm.jobs.train.run_centralized`` in a child process with one thread.
* Federated: ``flglm.jobs.subprocesses.run_federation``, 1 server + N clients under torchrun on
  loopback (one thread per process, as ``flglm.distributed.configure_threads`` gives on a
  2-core machine); IID split of the same rows. ``--sub-servers S``: a hierarchical server of
  S sub-server processes (S + N processes), client ``i`` served by sub-server ``i % S``.

All runs train on the same union of rows: the script fixes ``data.max_train_rows`` to the
configured subset rounded down to a multiple of every client count, so no run drops a
remainder the others keep. Dev accuracy is measured on the whole dev file, by the final
model (for a federation: after the last FedAvg, when every client holds the same blocks).

Why one thread for the centralized run: measured on this 2-core machine, a 2-thread
process is 20-40x slower whenever anything else uses a core (OpenMP spin-waits), so the
reference gets the same single thread each federation process gets. Train times are
reported for information; the figure this benchmark is about is accuracy.

``--pretrain-base``: parameter-efficient methods (``peft.method=lora`` or ``ptuning_v2``)
adapt what a base model already knows, and nothing can be downloaded here, so the script
first pretrains its own base: the same GLM, centralized, as a causal LM on the training
file's sentences (labels unused; 1 epoch over every row by default, ``--pretrain-rows``),
saved as a Hugging Face directory with its tokenizer. Every compared run then starts from
it (``model.path``). The pretraining is shared by the runs and not part of the comparison.
With a base (``--pretrain-base`` or ``--base``) the table also shows the base's dev accuracy
before any fine-tuning (``untrained_acc``), so what the compared runs learned is visible.

``--global-batch``: each of N clients steps on ``data.batch_size / N`` rows, so a federated
step covers as many rows as a centralized one. When every trained parameter sits on the
clients (P-tuning v2: the prefix encoder), the federation is plain data-parallel FedAvg, and
with SGD, FedAvg after every step is exactly a step on the clients' mean gradient, i.e. the
centralized step on their rows together; without this flag a C-client federation would take
C times fewer, larger steps per epoch than the centralized run.

``--pretrain-verdicts NEG,POS`` (with ``--pretrain-base``): a small LM pretrained on a few
hundred thousand words knows too little for prefixes alone to find sentiment in it (P-tuning
v2 stayed at chance on such bases, BENCHMARKS.md), where a large pretrained LM has read
countless reviews that say what their writer thought. This gives the base that knowledge in
other words than the task's: the pretraining sentences of the rows the compared runs do not
train on end in ``it was NEG`` or ``it was POS`` for their label; the runs' own rows stay bare
sentences, and the task still asks ``sentiment :`` with its own label words.

Runs go under ``runs/parity/`` (``--run-dir``); each run's output stays in its own directory
(``logs/``), not on stdout. stdout is a table and, as its last line, one JSON object whose
``ratio`` is the smallest federated / centralized dev-accuracy ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from flglm.benchmarking import centralized_worker, client_counts, find_data_dir, run_centralized_child

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "sst2.yaml"


def _shared_rows(config: Path, overrides: list[str], clients: list[int]) -> int:
    """Rows every run trains on: the configured subset, rounded down to suit every client count."""
    from flglm.config import load_config
    from flglm.data.loading import all_train_examples

    multiple = math.lcm(*clients)
    cfg = load_config(config, [*overrides, f"federation.num_clients={multiple}"])
    rows = len(all_train_examples(cfg))
    if rows == 0:
        raise SystemExit(f"parity: error: fewer training rows than {multiple} (the lcm of the client counts)")
    return rows


def _run_centralized(config: Path, overrides: list[str], run_dir: Path, timeout_s: float) -> dict[str, float]:
    return run_centralized_child(__file__, config, overrides, run_dir, timeout_s=timeout_s, prog="parity")


def _run_federated(config: Path, overrides: list[str], clients: int, run_dir: Path, timeout_s: float, sub_servers: int) -> dict[str, float]:
    from flglm.crypto.keyring import generate_key_set
    from flglm.jobs.subprocesses import FederationFailed, run_federation

    generate_key_set(run_dir / "keys", clients)  # encryption is on unless overridden
    try:
        run_federation(
            config,
            [f"crypto.key_dir={run_dir / 'keys'}", *overrides],
            num_clients=clients,
            sub_servers=sub_servers,
            run_dir=run_dir,
            timeout_s=timeout_s,
        )
    except FederationFailed as err:
        raise SystemExit(f"parity: error: the {clients}-client federation failed:\n{err}") from None
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = dict(summary["federation"])
    # The clients train concurrently: the federation's training time is the slowest client's.
    metrics["train_time_s"] = max(m["train_time_s"] for m in summary["clients"].values())
    return metrics


def _pretrain_base(
    config: Path, data: Path, root: Path, *, rows: int, timeout_s: float, verdicts: tuple[str, str] | None = None, kept_rows: int = 0
) -> Path:
    """Pretrain the config's model as a causal LM on the training sentences (centralized, full
    training), save it as ``root/base``, and return a copy of the config that starts from it.

    ``verdicts`` (negative word, positive word): the sentences of rows ``kept_rows`` onwards,
    rows the compared runs never train on, end in ``it was <word>`` for their label, so the base
    knows sentiment the way a large pretrained LM does, in words other than the task's own
    prompt and label words (see :func:`_pretraining_corpus`)."""
    from flglm.benchmarking import save_pretrained_base

    run_dir = root / "pretrain"
    shutil.rmtree(run_dir, ignore_errors=True)
    train_file = data / "train.tsv"
    if verdicts is not None:
        train_file = _pretraining_corpus(train_file, root / "pretrain_corpus.tsv", verdicts=verdicts, kept_rows=kept_rows)
    overrides = [
        f"data.train_path={train_file}",
        "data.dev_path=null",
        f"data.max_train_rows={rows if rows > 0 else 'null'}",
        "task.kind=language_modeling",
        "peft.method=none",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
    ]
    print(f"[parity] pretraining the base model ({rows or 'all'} rows, 1 epoch) ...", file=sys.stderr, flush=True)
    metrics = run_centralized_child(__file__, config, overrides, run_dir, timeout_s=timeout_s, prog="parity")
    base = save_pretrained_base(run_dir, root / "base")
    print(f"[parity] base pretrained: train loss {metrics.get('train_loss', float('nan')):.3f}, saved in {base}", file=sys.stderr, flush=True)
    return _from_base(config, base, root)


def _pretraining_corpus(train_file: Path, out: Path, *, verdicts: tuple[str, str], kept_rows: int) -> Path:
    """The training file with ``it was <verdict>`` appended to the sentence of every row from
    ``kept_rows`` on (label 0: ``verdicts[0]``, 1: ``verdicts[1]``); the first ``kept_rows``
    rows, which the compared runs fine-tune on, keep their bare sentence, so the base never
    sees those rows' labels."""
    from flglm.data.readers import read_tsv

    examples = read_tsv(train_file)
    lines = ["label\tsentence"]
    for index, example in enumerate(examples):
        text = example.text if index < kept_rows else f"{example.text} it was {verdicts[int(example.label)]}"
        lines.append(f"{example.label}\t{text}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def _from_base(config: Path, base: Path, root: Path) -> Path:
    """A copy of ``config`` (in ``root``) whose model is the Hugging Face directory ``base``."""
    from omegaconf import OmegaConf

    if not (base / "config.json").is_file():
        raise SystemExit(f"parity: error: --base {base} has no config.json")
    derived = OmegaConf.load(config)
    derived.model = {"path": str(base)}
    derived.data.tokenizer_path = None  # the base's own tokenizer (model.path) is used
    root.mkdir(parents=True, exist_ok=True)
    out = root / "config.yaml"
    OmegaConf.save(derived, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/sst2", help="directory with train.tsv and dev.tsv")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--clients", default="2,4", help="comma-separated client counts (default 2,4)")
    parser.add_argument(
        "--sub-servers",
        type=int,
        default=1,
        help="a hierarchical server of this many sub-server processes (default 1: one server)",
    )
    parser.add_argument("--pretrain-base", action="store_true", help="first pretrain the base model as a causal LM on the training text")
    parser.add_argument("--pretrain-rows", type=int, default=0, help="rows of the training file for pretraining (0: all)")
    parser.add_argument(
        "--pretrain-verdicts",
        metavar="NEG,POS",
        help="with --pretrain-base: rows the runs do not train on end in 'it was NEG' or 'it was POS' for their label",
    )
    parser.add_argument("--base", help="start every run from this Hugging Face directory (e.g. an earlier run's base/)")
    parser.add_argument(
        "--global-batch",
        action="store_true",
        help="each of N clients steps on data.batch_size / N rows, so every run's step covers the same rows in all",
    )
    parser.add_argument("--run-dir", default=str(REPO_ROOT / "runs" / "parity"))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed for each run")
    parser.add_argument("--centralized-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args()
    if args.centralized_worker:
        centralized_worker(args.config, args.overrides)
        return

    started = time.monotonic()
    config = Path(args.config).resolve()
    clients = client_counts(args.clients, prog="parity")
    reserved = [o for o in args.overrides if o.split("=", 1)[0] in ("run_dir", "federation.num_clients", "server.sub_servers")]
    if reserved:
        raise SystemExit(f"parity: error: {reserved}: set these with --run-dir, --clients and --sub-servers")
    if not 1 <= args.sub_servers <= min(clients):
        raise SystemExit(f"parity: error: --sub-servers must be between 1 and the smallest client count, got {args.sub_servers}")
    data = find_data_dir(args.data, REPO_ROOT, ("train.tsv", "dev.tsv"), prog="parity")
    root = Path(args.run_dir).resolve()
    pretrain_wall = None
    if args.base and args.pretrain_base:
        raise SystemExit("parity: error: give --base or --pretrain-base, not both")
    if args.base:
        config = _from_base(config, Path(args.base).resolve(), root)
    verdicts = None
    if args.pretrain_verdicts is not None:
        words = [w.strip() for w in args.pretrain_verdicts.split(",")]
        if not args.pretrain_base or len(words) != 2 or not all(words):
            raise SystemExit(f"parity: error: --pretrain-verdicts takes two words NEG,POS and needs --pretrain-base, got {args.pretrain_verdicts!r}")
        verdicts = (words[0], words[1])
    base = [
        f"data.train_path={data / 'train.tsv'}",
        f"data.dev_path={data / 'dev.tsv'}",
        "trainer.enable_progress_bar=false",
        *args.overrides,
    ]
    from flglm.config import ConfigError, load_config

    try:
        # The rows depend on the data settings only, so they are known before any pretraining.
        rows = _shared_rows(config, base, clients)
        base.append(f"data.max_train_rows={rows}")
        cfg = load_config(config, base)
    except ConfigError as err:
        raise SystemExit(f"parity: error: {err}") from None
    if args.global_batch and any(cfg.data.batch_size % n for n in clients):
        raise SystemExit(
            f"parity: error: --global-batch needs data.batch_size={cfg.data.batch_size} to be a multiple of every client count {clients}"
        )
    if cfg.task.kind != "classification":
        raise SystemExit(f"parity: error: compares dev accuracy, so task.kind must be classification, got {cfg.task.kind!r}")
    if args.pretrain_base:
        t0 = time.monotonic()
        config = _pretrain_base(config, data, root, rows=args.pretrain_rows, timeout_s=args.timeout, verdicts=verdicts, kept_rows=rows)
        pretrain_wall = round(time.monotonic() - t0, 1)

    untrained = None
    if args.base or args.pretrain_base:
        # What fine-tuning starts from: the base (and, with P-tuning, its untrained prefixes) on the dev set.
        print("[parity] untrained base: evaluating ...", file=sys.stderr, flush=True)
        run_dir = root / "untrained"
        shutil.rmtree(run_dir, ignore_errors=True)
        untrained = _run_centralized(config, [*base, f"federation.num_clients={max(clients)}", "trainer.max_steps=0"], run_dir, args.timeout)
        print(f"[parity] untrained base: val_acc {untrained['val_acc']:.4f}", file=sys.stderr, flush=True)

    results: dict[str, dict[str, float]] = {}
    walls: dict[str, float] = {}
    plan = [("centralized", None), *((f"federated_{n}", n) for n in clients)]
    for name, n in plan:
        run_dir = root / name
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"[parity] {name}: running ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        if n is None:
            # num_clients only decides the iid remainder here; the rows are already a multiple.
            overrides = [*base, f"federation.num_clients={max(clients)}"]
            results[name] = _run_centralized(config, overrides, run_dir, args.timeout)
        else:
            per_client = [f"data.batch_size={cfg.data.batch_size // n}"] if args.global_batch else []
            results[name] = _run_federated(config, [*base, *per_client], n, run_dir, args.timeout, args.sub_servers)
        walls[name] = time.monotonic() - t0
        print(f"[parity] {name}: val_acc {results[name]['val_acc']:.4f} in {walls[name]:.0f}s", file=sys.stderr, flush=True)

    print("\n".join(_table(results, walls, rows=rows, cfg=cfg, dev=data / "dev.tsv", untrained=untrained, global_batch=args.global_batch)))
    result = _result(results, rows=rows, epochs=cfg.trainer.max_epochs, overrides=args.overrides)
    if untrained is not None:
        result["untrained_acc"] = round(untrained["val_acc"], 4)
    result["sub_servers"] = args.sub_servers
    result["global_batch"] = args.global_batch
    if pretrain_wall is not None or args.base:
        result["base"] = str(Path(args.base).resolve() if args.base else root / "base")
    if pretrain_wall is not None:
        result["pretrain_wall_s"] = pretrain_wall
    result["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result))


def _ratios(results: dict[str, dict[str, float]]) -> dict[str, float]:
    central = results["centralized"]["val_acc"]
    return {name: m["val_acc"] / central for name, m in results.items() if name != "centralized"}


def _table(
    results: dict[str, dict[str, float]],
    walls: dict[str, float],
    *,
    rows: int,
    cfg: Any,
    dev: Path,
    untrained: dict[str, float] | None = None,
    global_batch: bool = False,
) -> list[str]:
    ratios = _ratios(results)
    header = f"{'run':<24}{'dev acc':>9}{'dev F1':>9}{'train s':>9}{'wall s':>9}{'ratio':>8}"
    setup = (
        f"SST-2 parity: {rows} training rows (IID), {cfg.trainer.max_epochs} epoch(s), batch {cfg.data.batch_size} "
        f"{'in all (split among the clients)' if global_batch else 'per client'}, "
        f"FedAvg every {cfg.federation.aggregate_every} step(s); dev: {dev}"
    )
    lines = [
        setup,
        header,
        "-" * len(header),
    ]
    for name, m in results.items():
        label = name.replace("federated_", "federated, ") + (" clients" if name in ratios else "")
        ratio = f"{ratios[name]:.4f}" if name in ratios else "1"
        lines.append(f"{label:<24}{m['val_acc']:>9.4f}{m['val_f1']:>9.4f}{m['train_time_s']:>9.1f}{walls[name]:>9.1f}{ratio:>8}")
    if untrained is not None:
        lines.append(f"{'(base, not fine-tuned)':<24}{untrained['val_acc']:>9.4f}{untrained['val_f1']:>9.4f}{'':>9}{'':>9}{'':>8}")
    return lines


def _result(results: dict[str, dict[str, float]], *, rows: int, epochs: int, overrides: list[str]) -> dict[str, object]:
    """The JSON line; ``ratio`` is the smallest federated / centralized dev-accuracy ratio."""
    ratios = _ratios(results)
    out: dict[str, object] = {"benchmark": "parity", "train_rows": rows, "epochs": epochs, "overrides": overrides}
    for name, m in results.items():
        out[f"{name}_acc"] = round(m["val_acc"], 4)
        out[f"{name}_f1"] = round(m["val_f1"], 4)
    for name, ratio in ratios.items():
        out[f"ratio_{name.removeprefix('federated_')}"] = round(ratio, 4)
    out["ratio"] = round(min(ratios.values()), 4)
    return out


if __name__ == "__main__":
    main()
