"""``flglm generate``: text through the trained split model, as a two-process job.

Under torchrun (rank 0 the server, rank 1 the client), or, over the socket link, each side on
its own machine (``--serve``, ``--server HOST:PORT``). The job itself is :mod:`flglm.jobs.generate`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from flglm.config import ConfigError, load_config
from flglm.config.loading import config_parser
from flglm.jobs.logs import report_failure


def _generate_parser() -> argparse.ArgumentParser:
    parser = config_parser(
        "flglm generate",
        "generate text through the trained split model: a server process with the middle stack and a "
        "client process with its blocks and the prompts (started with torchrun unless torchrun started this)",
    )
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--prompts-file", help="a UTF-8 file with one prompt per line")
    parser.add_argument(
        "--raw", action="store_true", help="feed the prompts as they are (default for task.kind=generation: inside task.prompt, as the model trained)"
    )
    parser.add_argument("--client", type=int, default=0, help="whose client blocks and keys to use")
    parser.add_argument("--weights", help="run directory holding the trained parts (default: the config's run_dir)")
    parser.add_argument("--base", action="store_true", help="generate with the base model (no trained weights)")
    parser.add_argument("--out", help="JSON file of the generations (default: RUN_DIR/generate/generations.json)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the job is killed")
    side = parser.add_mutually_exclusive_group()
    side.add_argument(
        "--serve",
        action="store_true",
        help="link.transport=socket: run only the server side, on its own (edge address in RUN_DIR/generate/edge.json)",
    )
    side.add_argument(
        "--server", metavar="HOST:PORT", help="link.transport=socket: run only this client, on its own, reaching that generation server"
    )
    return parser


def generate_main(argv: Sequence[str] | None = None) -> int:
    """``flglm generate``: check the inputs, then run (or, under torchrun, be one process of) the job."""
    from flglm.distributed import launched_distributed

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _generate_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if (args.serve or args.server) and cfg.link.transport != "socket":
            raise ValueError("--serve and --server run one side on its own over the socket link: give link.transport=socket")
        prompts = list(args.prompt)
        if args.prompts_file:
            prompts += [line for line in Path(args.prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        if not args.serve and (not prompts or not all(p.strip() for p in prompts)):
            raise ValueError("give at least one non-empty --prompt (or --prompts-file)")
        run_dir = Path(args.weights or cfg.run_dir)
        weights = None if args.base else run_dir
        if weights is not None:
            from flglm.run_layout import client_weights_path, middle_weights_path

            # each side needs only its own part (on its own, a side has only its own)
            needed = ([] if args.server else [middle_weights_path(weights)]) + ([] if args.serve else [client_weights_path(weights, args.client)])
            for path in needed:
                if not path.is_file():
                    raise FileNotFoundError(f"no trained weights at {path} (pass --weights RUN_DIR, or --base for the untrained model)")
        out = Path(args.out or run_dir / "generate" / "generations.json")
        if args.server:
            from flglm.jobs.edge_link import parse_address

            parse_address(args.server)  # a bad address fails here, before any model is built
    except (ConfigError, OSError, ValueError) as err:
        print(f"flglm: error: {err}", file=sys.stderr)
        return 2
    if args.serve or args.server:
        return _generate_one_side(cfg, args, prompts, weights, out)
    if launched_distributed():
        return _generate_worker(cfg, args, prompts, weights, out)
    from flglm.jobs.subprocesses import GENERATE_SCRIPT, FederationFailed, run_torchrun

    if cfg.link.transport == "socket":  # the server writes a fresh address; the client must not read an old one
        from flglm.run_layout import generation_edge_path

        generation_edge_path(cfg.run_dir).unlink(missing_ok=True)

    try:
        run_torchrun(GENERATE_SCRIPT, argv, nproc=2, timeout_s=args.timeout, run_dir=Path(cfg.run_dir))
    except FederationFailed as err:
        print(f"flglm: error: {err}", file=sys.stderr)
        return 1
    _print_generations(out)
    return 0


def _print_generations(out: Path) -> None:
    import json

    for row in json.loads(out.read_text()):
        print(f"{row['prompt']}\n  -> {row['generated']}")
    print(f"wrote {out}")


def _generate_one_side(cfg, args: argparse.Namespace, prompts: list[str], weights: Path | None, out: Path) -> int:
    """``--serve`` or ``--server HOST:PORT``: one side of a socket-link generation job, on its own machine."""
    from flglm.distributed import configure_threads, read_server_env
    from flglm.jobs.edge_link import parse_address
    from flglm.jobs.generate import generate_as_client, serve_generation
    from flglm.jobs.logs import setup_logging
    from flglm.roles import edge_client_role

    name = "generate-server" if args.serve else f"generate-client{args.client}"
    file_log = setup_logging(Path(cfg.run_dir), name)
    configure_threads(1, cfg.server.num_threads if args.serve else 0)
    try:
        if args.serve:
            serve_generation(cfg, read_server_env(), client_index=args.client, weights=weights)
            return 0
        role = edge_client_role(args.client, num_clients=cfg.federation.num_clients)
        generate_as_client(cfg, None, role, prompts=prompts, weights=weights, out=out, raw=args.raw, edge_address=parse_address(args.server))
    except Exception as err:  # noqa: BLE001 - reported once (see report_failure)
        return report_failure(Path(cfg.run_dir), name, 0, err, file_log)
    _print_generations(out)
    return 0


def _generate_worker(cfg, args: argparse.Namespace, prompts: list[str], weights: Path | None, out: Path) -> int:
    from flglm.distributed import configure_threads, read_env
    from flglm.jobs.generate import generate_as_client, serve_generation
    from flglm.jobs.logs import setup_logging
    from flglm.roles import generation_role

    env = read_env()
    role = generation_role(env.rank, env.world_size, client_index=args.client, num_clients=cfg.federation.num_clients)
    name = f"generate-{role.worker_name}"
    file_log = setup_logging(Path(cfg.run_dir), name)
    configure_threads(env.local_world_size)
    try:
        if role.kind == "server":
            serve_generation(cfg, env, client_index=args.client, weights=weights)
        else:
            generate_as_client(cfg, env, role, prompts=prompts, weights=weights, out=out, raw=args.raw)
    except Exception as err:  # noqa: BLE001 - reported once (see report_failure)
        return report_failure(Path(cfg.run_dir), name, env.rank, err, file_log)
    return 0
