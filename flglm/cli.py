"""Command line: ``flglm train`` (one federation process, under torchrun), ``flglm client`` (a client of a
socket-link federation, on its own), ``flglm centralized``
(the whole model in one process), ``flglm generate`` (text through the trained split model),
``flglm export`` (merge a run's parts into one HF directory), ``flglm keygen`` (identity keys
for encrypted federations), ``flglm attack`` (what a curious server or peer recovers of a
client's text, on a finished run), ``flglm tokenizer`` (one vocabulary for all clients, from
public text).

    torchrun --standalone --nproc-per-node=3 launch/train.py --config configs/demo.yaml
    flglm centralized --config configs/demo.yaml run_dir=runs/central
    flglm generate --config runs/demo/config.yaml --prompt "the movie was"
    flglm tokenizer --corpus public.txt --vocab-size 8000 --out tokenizers/public --kind byte_bpe
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from flglm.config import ConfigError, load_config
from flglm.config.loading import config_parser
from flglm.jobs.logs import report_failure

log = logging.getLogger("flglm")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return config_parser(prog, description)


def train_main(argv: Sequence[str] | None = None) -> int:
    """Entry of every federation process (under torchrun, or started on its own with
    ``federation.membership=dynamic``): read config and environment, take the rank's role."""
    parser = _parser("flglm train", "run one process of a federation (use under torchrun)")
    parser.add_argument(
        "--sub-server", type=int, default=None, metavar="I", help="link.transport=socket: start hierarchical sub-server I on its own (no torchrun)"
    )
    parser.add_argument(
        "--cluster",
        default=None,
        metavar="HOST:PORT",
        help="with --sub-server: where sub-server 0 hosts the sub-servers' store (HOST: its address on their own network)",
    )
    args = parser.parse_args(argv)
    from flglm.distributed import configure_threads, read_env
    from flglm.jobs.logs import setup_logging
    from flglm.roles import role_for_rank
    from flglm.run_dirs import RunDirError, check_run_dir, finished, move_aside, wait_until_moved

    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.link.transport == "socket":  # only the server: each client is started with `flglm client`
            from flglm.distributed import read_server_env
            from flglm.roles import edge_server_role

            env = read_server_env(sub_server=args.sub_server, cluster=args.cluster, sub_servers=cfg.server.sub_servers)
            role = edge_server_role(env.rank, env.world_size, sub_servers=cfg.server.sub_servers)
        else:
            if args.sub_server is not None or args.cluster is not None:
                raise ConfigError("--sub-server/--cluster start a sub-server of the socket link on its own: add link.transport=socket")
            env = read_env(dynamic=cfg.federation.membership == "dynamic")
            role = role_for_rank(env.rank, env.world_size, num_clients=cfg.federation.num_clients, sub_servers=cfg.server.sub_servers)
        run_dir = Path(cfg.run_dir)
        check_run_dir(run_dir, resume=cfg.resume, overwrite=cfg.overwrite)  # before this process writes anything
        if cfg.overwrite and not cfg.resume and finished(run_dir):
            if env.local_rank == 0:  # one process per machine renames it; the others wait for that
                print(f"flglm: overwrite=true: moved the finished run to {move_aside(run_dir)}", file=sys.stderr)
            else:
                wait_until_moved(run_dir, timeout_s=cfg.server.startup_timeout_s)
    except RunDirError as err:
        if env.local_rank == 0:  # every process refuses; one says why
            print(f"flglm: error: {err}", file=sys.stderr)
        return 2
    except (ConfigError, RuntimeError, ValueError) as err:
        print(f"flglm: error: {err}", file=sys.stderr)
        return 2
    file_log = setup_logging(run_dir, role.worker_name)
    threads = configure_threads(env.local_world_size, cfg.server.num_threads if role.kind == "server" else 0)
    log.info("%s (rank %d of %d), %d thread(s)", role.worker_name, env.rank, env.world_size, threads)
    try:
        if role.kind == "server":
            from flglm.jobs.serve import run_server  # a server process imports no Lightning

            run_server(cfg, env, role)
        else:
            from flglm.input_files import check_client_inputs

            assert role.client_index is not None
            check_client_inputs(cfg, role.client_index)  # before importing the training stack
            from flglm.jobs.train import run_client

            run_client(cfg, env, role)
    except Exception as err:  # noqa: BLE001 - reported once, in one line; the traceback goes to the log file
        return report_failure(run_dir, role.worker_name, env.rank, err, file_log)
    return 0


def client_main(argv: Sequence[str] | None = None) -> int:
    """``flglm client``: one client of a socket-link federation, on its own (no torchrun, no RPC):
    it needs its key, its data, the config and the server's edge address."""
    parser = _parser("flglm client", "run one client of a federation whose server listens on an edge (link.transport=socket)")
    parser.add_argument("--client", type=int, required=True, help="this client's index (its key is client{i}.key)")
    parser.add_argument("--server", required=True, help="the server's edge, HOST:PORT (see the server's run_dir/edge.json)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: every core of this machine)")
    args = parser.parse_args(argv)
    from flglm.distributed import configure_threads
    from flglm.input_files import check_client_inputs
    from flglm.jobs.edge_link import parse_address
    from flglm.jobs.logs import setup_logging
    from flglm.roles import edge_client_role

    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.link.transport != "socket":
            raise ValueError(f"flglm client needs link.transport=socket in the config, got {cfg.link.transport!r}")
        address = parse_address(args.server)
        role = edge_client_role(args.client, num_clients=cfg.federation.num_clients)
        if args.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {args.threads}")
        check_client_inputs(cfg, args.client)  # before importing the training stack
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"flglm: error: {err}", file=sys.stderr)
        return 2
    from flglm.jobs.train import run_client

    setup_logging(Path(cfg.run_dir), role.worker_name)
    threads = configure_threads(1, args.threads)
    log.info("%s: server edge %s:%d, %d thread(s)", role.worker_name, *address, threads)
    run_client(cfg, None, role, edge_address=address)
    return 0


def centralized_main(argv: Sequence[str] | None = None) -> int:
    args = _parser("flglm centralized", "train the whole model in one process (the reference)").parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"flglm: error: {err}", file=sys.stderr)
        return 2
    from flglm.distributed import configure_threads
    from flglm.jobs.logs import setup_logging
    from flglm.jobs.train import run_centralized

    file_log = setup_logging(Path(cfg.run_dir), "centralized")
    configure_threads(1)
    try:
        metrics = run_centralized(cfg)
    except Exception as err:  # noqa: BLE001 - reported once, in one line; the traceback goes to the log file
        return report_failure(Path(cfg.run_dir), "centralized", 0, err, file_log)
    print(metrics)
    return 0


def generate_main(argv: Sequence[str] | None = None) -> int:
    """``flglm generate`` (:mod:`flglm.generate_command`)."""
    from flglm.generate_command import generate_main as main

    return main(argv)


def export_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flglm export", description="merge a run's parts into a Hugging Face directory")
    parser.add_argument("--run-dir", required=True, help="a finished federation's run_dir")
    parser.add_argument("--out", required=True, help="directory to write (config, weights, tokenizer)")
    parser.add_argument("--client", type=int, default=0, help="whose client blocks to take (all equal after FedAvg)")
    args = parser.parse_args(argv)
    from flglm.export import export_run

    try:
        out = export_run(args.run_dir, args.out, client=args.client)
    except (FileNotFoundError, ValueError) as err:
        print(f"flglm: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def keygen_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flglm keygen",
        description="write X25519 identity keys (private key mode 0600, public key as hex .pub); never overwrites",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--dir", help="write server.key and client0..N-1.key (with .pub) into this directory")
    group.add_argument("--out", help="write one identity to this path (e.g. keys/client3.key) and its .pub beside it")
    parser.add_argument("--clients", type=int, default=1, help="number of client identities with --dir")
    args = parser.parse_args(argv)
    from flglm.crypto.keyring import generate_key_set
    from flglm.crypto.keys import generate_identity

    try:
        if args.out:
            public = generate_identity(args.out)
            print(f"wrote {args.out} (public key {public.hex()})")
            return 0
        if args.clients < 1:
            raise ValueError(f"--clients must be >= 1, got {args.clients}")
        written = generate_key_set(args.dir, args.clients)
    except (OSError, ValueError) as err:
        print(f"flglm: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} identities in {args.dir}" + (f": {', '.join(p.name for p in written)}" if written else " (all existed)"))
    return 0


def attack_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flglm attack",
        description="run the privacy attacks (curious server, curious peer, FedAvg uploads) on a finished run's client",
    )
    parser.add_argument("--config", required=True, help="the run's saved config (RUN/config.yaml)")
    parser.add_argument("--text", required=True, help="the victim's text: a TSV/JSONL file the run's data.format reads")
    parser.add_argument("--public", required=True, help="text the attacker has (same format; must not overlap --text)")
    parser.add_argument("--rows", type=int, default=32, help="victim sentences attacked")
    parser.add_argument("--public-rows", type=int, default=4000, help="public sentences for the inversion network")
    parser.add_argument("--client", type=int, default=0, help="which client's saved blocks to attack")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--inversion-steps", type=int, default=1000, help="training steps of the attacker's inversion network")
    parser.add_argument("--out", help="write the figures as JSON here (default RUN/privacy/attack.json)")
    args = parser.parse_args(argv)
    import json

    import torch

    from flglm.data.loading import file_texts
    from flglm.data.readers import DataFormatError
    from flglm.privacy.evaluation import attack_saved_run

    torch.set_num_threads(1)
    run_dir = Path(args.config).resolve().parent
    try:
        cfg = load_config(args.config)
        victims = file_texts(cfg, args.text)[: args.rows]
        public = file_texts(cfg, args.public)[: args.public_rows]
        result = attack_saved_run(
            run_dir, victims, public, max_length=args.max_length, inversion_steps=args.inversion_steps, client_index=args.client
        )
    except (ConfigError, DataFormatError, FileNotFoundError, ValueError) as err:
        print(f"flglm: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else run_dir / "privacy" / "attack.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    server = result["server"]
    for name, figures in server.items():
        print(f"curious server, {name}: token accuracy {figures['token_accuracy']:.3f}, exact sequences {figures['exact_match']:.3f}")
    print(
        f"peer, clear link: {result['peer_clear']['token_accuracy']:.3f}; encrypted link: {result['peer_encrypted']['token_accuracy']:.3f} (opened: {result['peer_encrypted']['opened']})"
    )
    if "aggregation_plain" in result:
        print(
            f"FedAvg upload reveals the client's tokens with precision {result['aggregation_plain']['precision']:.2f}; secure aggregation: {result['aggregation_secure']['precision']:.2f}"
        )
    print(
        f"controls: positive {result['positive_control']:.3f}, negative {result['negative_control']['token_accuracy']:.3f} (chance {result['negative_control']['chance']:.3f})"
    )
    print(f"wrote {out}")
    return 0


def tokenizer_main(argv: Sequence[str] | None = None) -> int:
    """Build the federation's tokenizer from public text; use it with ``data.tokenizer_path=DIR``.

    Naming the private training file as ``--corpus`` works, but is a choice to derive the shared
    vocabulary (which every party holds) from private text.
    """
    parser = argparse.ArgumentParser(prog="flglm tokenizer", description="build one tokenizer for every client from public text")
    parser.add_argument("--corpus", nargs="+", required=True, help="public text: .txt (one text a line) or data files (.jsonl, .tsv)")
    parser.add_argument("--vocab-size", type=int, default=8000, help="tokens in all, special tokens (and for byte_bpe the 256 bytes) included")
    parser.add_argument("--out", required=True, help="directory to write (then data.tokenizer_path=DIR)")
    parser.add_argument("--kind", choices=("byte_bpe", "bytes", "word"), default="byte_bpe")
    parser.add_argument("--required", nargs="*", default=[], help="words that must be one token each (label words)")
    parser.add_argument("--format", default="auto", help="data.format of the corpus data files")
    parser.add_argument("--text-field", default=None, help="data.text_field of the corpus data files")
    args = parser.parse_args(argv)
    from flglm.data.public_tokenizer import build_tokenizer_from_files
    from flglm.data.readers import DataFormatError
    from flglm.data.tokenizer import tokenizer_fingerprint

    try:
        tokenizer = build_tokenizer_from_files(
            args.corpus, kind=args.kind, vocab_size=args.vocab_size, out=args.out, required=args.required, fmt=args.format, text_field=args.text_field
        )
    except (DataFormatError, FileNotFoundError, ValueError) as err:
        print(f"flglm: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote a {args.kind} tokenizer of {len(tokenizer)} tokens to {args.out} (fingerprint {tokenizer_fingerprint(tokenizer)[:16]})")
    return 0


def compare_main(argv: Sequence[str] | None = None) -> int:
    """Finished runs side by side: a table of final metrics, the ratio to the reference run, the loss curves."""
    parser = argparse.ArgumentParser(
        prog="flglm compare",
        description="compare finished runs (federated and centralized): a table, ratios to the reference, a loss-curve plot",
    )
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="a federation's run_dir (summary.json), a centralized run's, or both (make demo's)"
    )
    parser.add_argument("--out", default=None, help="where comparison.json and loss_curves.png go (default: the first RUN_DIR)")
    args = parser.parse_args(argv)
    from flglm.jobs.compare import CompareError, compare_runs, write_comparison

    try:
        comparison = compare_runs(args.run_dirs)
    except CompareError as err:
        print(f"flglm compare: error: {err}", file=sys.stderr)
        return 2
    print(comparison.table())
    print()
    print("\n".join(comparison.ratio_lines()))
    json_path, plot_path = write_comparison(comparison, args.out or args.run_dirs[0])
    print(f"wrote {json_path} and {plot_path}")
    return 0


COMMANDS = {
    "train": train_main,
    "client": client_main,
    "centralized": centralized_main,
    "generate": generate_main,
    "export": export_main,
    "keygen": keygen_main,
    "attack": attack_main,
    "tokenizer": tokenizer_main,
    "compare": compare_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: flglm {{{','.join(COMMANDS)}}} --config FILE [key=value ...]", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
