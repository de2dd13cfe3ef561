"""Privacy: what a curious server and a curious peer recover of a client's text, per configuration,
next to the SST-2 dev accuracy the same configuration reaches.

    python benchmarks/privacy.py --data ../shared/data/sst2
    python benchmarks/privacy.py --data ../shared/data/sst2 --rows 2000 --epochs 1 --only public_block0   # a quick try

For every configuration (rows of the table):

1. A 2-client federation (``configs/sst2.yaml``: GLM hidden 64, 4 blocks, word-level
   tokenizer; encryption and secure aggregation on) is trained on the first ``--rows`` SST-2
   training phrases under torchrun; its dev accuracy is the utility column.
2. With the trained weights, client 0 makes one language-model training step on
   ``--victims`` held-out SST-2 dev sentences through a real link to a curious server (the
   real server code, logging what it is handed) and the server attacks it with the client
   blocks it knows: the FedAvg average of the shared ones, the public (initial) weights of
   private ones. Attacks: nearest-neighbour inversion against the embedding table, a learned
   inversion network (trained by the attacker on ``--public`` other SST-2 training sentences,
   never seen by the federation), candidate search through the known input block, and label
   recovery from the returned gradient. A peer with the same shared blocks attacks the
   captured wire traffic, without and with encryption.
3. Aggregation channel: two clients start from the public weights, train 2 SGD steps each on
   their half of the victim sentences and meet for a FedAvg round; the server guesses client
   0's token set from the embedding rows its upload changed (plain FedAvg) or, with secure
   aggregation, from what it has: the masked upload and the average. Scored by precision.

Controls, fixed before running: positive = raw embeddings inverted by nearest neighbour,
must be >= 0.95; negative = candidate search on hidden states of shuffled text, scored against
the real text, must be within 0.05 of chance (sum of squared token frequencies). The script
exits non-zero if a control fails.

stdout: the table, then one JSON line with every figure, ``positive_control`` and
``negative_control`` (token accuracy). ``--plot`` writes the figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "sst2.yaml"

CONFIGURATIONS: dict[str, tuple[str, list[str]]] = {
    "embeddings_only": ("embeddings only (0 client blocks)", ["split.client_head_layers=0"]),
    "public_block0": ("FL-GLM split, public block 0", []),
    "public_2blocks": ("2 client blocks, public", ["split.client_head_layers=2"]),
    "private_blocks": ("private blocks (fine-tuned, not averaged)", ["privacy.private_blocks=[input,output]"]),
    "private_secret_init": ("private blocks, secret init", ["privacy.private_blocks=[input,output]", "privacy.secret_init=true"]),
    "noise_0.5": ("noise 0.5 (hidden + gradient)", ["privacy.hidden_noise=0.5", "privacy.grad_noise=0.5"]),
    "noise_2": ("noise 2 (hidden + gradient)", ["privacy.hidden_noise=2.0", "privacy.grad_noise=2.0"]),
    "noise_8": ("noise 8 (hidden + gradient)", ["privacy.hidden_noise=8.0", "privacy.grad_noise=8.0"]),
}
"""name -> (label, overrides). Noise rows clip each sent hidden state at the median norm of the
public input block's output on public text (``privacy.hidden_clip``, measured at start) and scale
gradient noise to each gradient vector's own norm."""


def _federate(config: Path, overrides: list[str], run_dir: Path, timeout_s: float) -> float:
    from flglm.crypto.keyring import generate_key_set
    from flglm.jobs.subprocesses import FederationFailed, run_federation

    shutil.rmtree(run_dir, ignore_errors=True)
    generate_key_set(run_dir / "keys", 2)
    try:
        run_federation(config, [f"crypto.key_dir={run_dir / 'keys'}", *overrides], num_clients=2, run_dir=run_dir, timeout_s=timeout_s)
    except FederationFailed as err:
        raise SystemExit(f"privacy: error: the federation of {run_dir.name} failed:\n{err}") from None
    return float(json.loads((run_dir / "summary.json").read_text())["federation"]["val_acc"])


def _sentences(path: Path, *, skip: int, count: int) -> list[str]:
    from flglm.data.readers import read_tsv

    rows = read_tsv(path, text_field="sentence", label_field="label")
    return [r.text for r in rows[skip : skip + count]]


def _median_hidden_norm(cfg: Any, public: Any) -> float:
    from flglm.privacy.attacks import input_hidden
    from flglm.privacy.evaluation import client_blocks

    hidden = input_hidden(client_blocks(cfg), public.input_ids, public.attention_mask)
    return float(hidden[public.attention_mask.bool()].norm(dim=-1).median())


def _attack_run(run_dir: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    from flglm.privacy.evaluation import attack_saved_run

    return attack_saved_run(
        run_dir,
        _sentences(data / "dev.tsv", skip=0, count=args.victims),
        _sentences(data / "train.tsv", skip=args.public_from, count=args.public),
        max_length=args.max_length,
        inversion_steps=args.inversion_steps,
    )


def _row(name: str, label: str, acc: float, r: dict[str, Any]) -> dict[str, Any]:
    server = r["server"]
    return {
        "name": name,
        "label": label,
        "nearest_embedding": server["nearest_embedding"]["token_accuracy"],
        "learned_inversion": server["learned_inversion"]["token_accuracy"],
        "candidate_search": server["candidate_search"]["token_accuracy"],
        "candidate_search_exact": server["candidate_search"]["exact_match"],
        "label_recovery": server["label_recovery"]["token_accuracy"],
        "aggregation_plain_precision": r["aggregation_plain"]["precision"],
        "aggregation_plain_recall": r["aggregation_plain"]["recall"],
        "aggregation_secure_precision": r["aggregation_secure"]["precision"],
        "peer_clear": r["peer_clear"]["token_accuracy"],
        "peer_encrypted": r["peer_encrypted"]["token_accuracy"],
        "peer_encrypted_opened": r["peer_encrypted"]["opened"],
        "ciphertext_as_floats": r["peer_encrypted"]["ciphertext_as_floats"],
        "sst2_dev_accuracy": acc,
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    head = ["configuration", "NN inv", "learned", "cand.search", "labels(grad)", "agg plain P/R", "agg secure P", "peer clear", "peer enc", "SST-2 acc"]
    print(" | ".join(head))
    for r in rows:
        cells = [
            r["label"],
            f"{r['nearest_embedding']:.3f}",
            f"{r['learned_inversion']:.3f}",
            f"{r['candidate_search']:.3f}",
            f"{r['label_recovery']:.3f}",
            f"{r['aggregation_plain_precision']:.2f}/{r['aggregation_plain_recall']:.2f}",
            f"{r['aggregation_secure_precision']:.2f}",
            f"{r['peer_clear']:.3f}",
            f"{r['peer_encrypted']:.3f}",
            f"{r['sst2_dev_accuracy']:.4f}",
        ]
        print(" | ".join(cells), flush=True)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["name"] for r in rows]
    series = [("candidate search", "candidate_search"), ("learned inversion", "learned_inversion"), ("NN inversion", "nearest_embedding"), ("labels from gradient", "label_recovery"), ("SST-2 dev accuracy", "sst2_dev_accuracy")]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(series)
    for k, (title, key) in enumerate(series):
        ax.bar([i + k * width for i in range(len(rows))], [r[key] for r in rows], width, label=title)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, rotation=20, ha="right")
    ax.set_ylabel("token accuracy of the attack / dev accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("What a curious server recovers (token accuracy) vs. what the model still learns (SST-2)")
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/sst2", help="directory with train.tsv and dev.tsv")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--rows", type=int, default=6000, help="SST-2 training phrases each federation trains on")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--victims", type=int, default=32, help="held-out dev sentences attacked")
    parser.add_argument("--public", type=int, default=2000, help="public sentences the attacker trains its inversion network on")
    parser.add_argument("--public-from", type=int, default=40000, help="first training row of the attacker's public text (outside --rows)")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--inversion-steps", type=int, default=600)
    parser.add_argument("--only", default="", help="comma-separated configuration names (default: all): " + ",".join(CONFIGURATIONS))
    parser.add_argument("--run-dir", default="runs/privacy")
    parser.add_argument("--plot", default=str(REPO_ROOT / "benchmarks" / "figures" / "privacy.png"))
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()

    import torch

    from flglm.benchmarking import find_data_dir
    from flglm.config import load_config
    from flglm.data import load_tokenizer
    from flglm.privacy.evaluation import NEGATIVE_CONTROL_MARGIN, POSITIVE_CONTROL_MIN, encode_texts

    torch.set_num_threads(1)
    if args.public_from < args.rows:
        raise SystemExit("privacy: error: --public-from must be >= --rows (the attacker's text must be outside the federation's)")
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CONFIGURATIONS)
    unknown = [n for n in names if n not in CONFIGURATIONS]
    if unknown:
        raise SystemExit(f"privacy: error: unknown configuration(s) {unknown}; known: {list(CONFIGURATIONS)}")
    data = find_data_dir(args.data, REPO_ROOT, ("train.tsv", "dev.tsv"), prog="privacy")
    root = Path(args.run_dir).resolve()
    common = [
        f"data.train_path={data / 'train.tsv'}",
        f"data.dev_path={data / 'dev.tsv'}",
        f"data.max_train_rows={args.rows}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.enable_progress_bar=false",
    ]
    started = time.monotonic()
    clip: float | None = None
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    for name in names:
        label, overrides = CONFIGURATIONS[name]
        if name.startswith("noise") and clip is None:
            first = root / names[0]
            cfg = load_config(first / "config.yaml") if (first / "config.yaml").is_file() else None
            if cfg is None:
                raise SystemExit("privacy: error: noise rows need a finished run before them (to measure the clip norm)")
            tokenizer = load_tokenizer(first / "tokenizer")
            public = encode_texts(tokenizer, _sentences(data / "train.tsv", skip=args.public_from, count=512), args.max_length)
            clip = _median_hidden_norm(load_config(first / "config.yaml", ["split.client_head_layers=1"]), public)
            print(f"[privacy] noise rows clip sent hidden states at {clip:.4f} (median norm on public text)", file=sys.stderr, flush=True)
        if name.startswith("noise"):
            overrides = [*overrides, f"privacy.hidden_clip={clip}"]
        run_dir = root / name
        print(f"[privacy] {name}: federated training ...", file=sys.stderr, flush=True)
        acc = _federate(Path(args.config), [*common, *overrides], run_dir, args.timeout)
        print(f"[privacy] {name}: dev accuracy {acc:.4f}; attacking ...", file=sys.stderr, flush=True)
        result = _attack_run(run_dir, data, args)
        results[name] = result
        rows.append(_row(name, label, acc, result))
    _print_table(rows)
    reference = results.get("public_block0") or next(iter(results.values()))
    positive = float(reference["positive_control"])
    negative = reference["negative_control"]
    print(f"positive control (raw embeddings, NN): {positive:.3f} (must be >= {POSITIVE_CONTROL_MIN})")
    print(
        f"negative control (shuffled text, candidate search): {negative['token_accuracy']:.3f}, chance {negative['chance']:.3f} "
        f"(always the most frequent token: {negative['majority']:.3f})"
    )
    if args.plot:
        _plot(rows, Path(args.plot))
    summary = {
        "rows": rows,
        "positive_control": positive,
        "negative_control": negative["token_accuracy"],
        "chance": negative["chance"],
        "majority": negative["majority"],
        "clip": clip,
        "details": results,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary, default=float))
    if positive < POSITIVE_CONTROL_MIN or abs(negative["token_accuracy"] - negative["chance"]) > NEGATIVE_CONTROL_MARGIN:
        raise SystemExit("privacy: a control failed: the attacks or their scoring are broken; the figures above are not valid")


if __name__ == "__main__":
    main()
