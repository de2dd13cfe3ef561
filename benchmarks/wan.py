"""Split training across a slow network: the client and the server on separate hosts, per wire dtype.

    python benchmarks/wan.py                                  # 25, 100 and 1000 Mbit/s; parity on SST-2
    python benchmarks/wan.py --rates 100,1000 --steps 10 --skip-parity
    python benchmarks/wan.py --parity-dtypes int8 data.max_train_rows=4000   # overrides for the parity runs

Needs root (Linux network namespaces, :mod:`flglm.network_hosts`). Two hosts are created, a
server and a client, each in its own namespace with its own address on a private test subnet,
joined by a veth link that ``tbf`` limits to each rate in ``--rates`` (both ways; this kernel has
no ``netem``, so no added delay: the link's cost measured here is its bandwidth alone).

Step time, per rate: the server process (its host, one thread) serves one middle stack per
wire dtype (``link.wire_dtype``: float32, bfloat16, float16, int8), each on its own edge
(:mod:`flglm.server.edge`), encrypted (X25519 handshake, AES-256-GCM). The client process
(its host, one thread) trains, interleaved in a rotating order, a centralized model (the whole
GLM in its own process: the reference) and one split model per wire dtype over the socket
link, all on the same batch (the overhead benchmark's model: GLM hidden 256, 6 layers, batch
16 x 64). The server's optimizer step goes with each step's backward, so a step is 2 round
trips. Reported: median step time, the link's bytes per step (both directions, sealed) and
messages per step, as measured by the client's link.

Parity: the SST-2 setting of ``benchmarks/parity.py`` (``configs/sst2.yaml``: 12000 rows,
2 epochs) trained centralized once and federated with 2 clients (torchrun on loopback,
encrypted) once per dtype of ``--parity-dtypes``; the ratio is federated / centralized dev
accuracy. Key=value overrides after the flags go to every parity run (e.g. a smaller subset).

A plot of step time against link speed, one line per wire dtype and the centralized step, goes
to ``benchmarks/figures/wan.png`` (``--figure`` elsewhere, e.g. for a short trial run); results are written to ``--run-dir``/results.json as each
is known. stdout is a table and, as its last line, one JSON object: ``ratio_100mbit_int8``
(federated / centralized step time at 100 Mbit/s, int8 wire), ``wire_bytes_ratio_int8`` (the
int8 wire's bytes per step / float32's), ``round_trips_per_step``, ``parity_int8`` (and the
same for the other dtypes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # the workers run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from flglm.benchmarking import speed_batch, speed_model

MODEL = speed_model()
WIRE_DTYPES = ("float32", "bfloat16", "float16", "int8")
MAX_MESSAGE_BYTES = 1 << 30
STEP_GOAL = 1.20
BYTES_GOAL = 0.27
ROUND_TRIP_GOAL = 2.0
PARITY_GOAL = 0.99
WORKER_TIMEOUT_S = 900.0
FIGURE = REPO_ROOT / "benchmarks" / "figures" / "wan.png"


def _config(wire_dtype: str):
    from flglm.config import ModelConfig, RunConfig

    cfg = RunConfig()
    cfg.model = ModelConfig(config=dict(MODEL))
    cfg.data.train_path = "unused"
    cfg.federation.num_clients = 1
    cfg.crypto.secure_aggregation = False  # no aggregation here
    cfg.link.wire_dtype = wire_dtype
    return cfg


# --------------------------------------------------------------------- server host


def _serve(args: argparse.Namespace) -> None:
    """One encrypted edge per wire dtype on ``args.host``; their ports go to ``args.ports``."""
    from flglm.crypto.keyring import load_server_keys
    from flglm.crypto.sessions import ServerSessions
    from flglm.distributed import configure_threads
    from flglm.server.edge import Edge
    from flglm.server.endpoint import ServerEndpoint
    from flglm.server.middle_server import MiddleServer

    configure_threads(2)
    keys = load_server_keys(args.key_dir, 1)
    servers, edges, ports = [], [], {}
    for dtype in WIRE_DTYPES:
        server = MiddleServer(_config(dtype))
        sessions = ServerSessions(keys.identity, {0: keys.client_keys[0]}, max_message_bytes=MAX_MESSAGE_BYTES)
        edge = Edge(
            ServerEndpoint(server, sessions), host=args.host, port=0, encrypted=True, max_frame_bytes=MAX_MESSAGE_BYTES,
            first_frame_timeout_s=30, call_timeout_s=300, max_connections=8, max_connections_per_client=2,
        )  # fmt: skip
        ports[dtype] = edge.start()[1]
        servers.append(server)
        edges.append(edge)
    Path(args.ports).write_text(json.dumps(ports))
    for server in servers:
        server.wait_until_done(timeout=WORKER_TIMEOUT_S)
    for edge in edges:
        edge.close()


# --------------------------------------------------------------------- client host


def _train(args: argparse.Namespace) -> dict[str, Any]:
    """Time the centralized step and each wire dtype's split step, interleaved."""
    import torch

    from flglm.client.lm import FullCausalLM, SplitCausalLM
    from flglm.client.remote import RemoteMiddle
    from flglm.client.server_link import ServerLink
    from flglm.config import fingerprint
    from flglm.crypto.keyring import load_client_keys
    from flglm.crypto.sessions import ClientSession
    from flglm.distributed import configure_threads
    from flglm.link.socket_transport import SocketTransport
    from flglm.models.split import ClientBlocks, build_full_model, plan_for
    from flglm.optim import build_optimizer

    configure_threads(2)
    ports = json.loads(Path(args.ports).read_text())
    keys = load_client_keys(args.key_dir, 0, 1)
    links, models, optimizers = {}, {}, {}
    for dtype in WIRE_DTYPES:
        cfg = _config(dtype)
        transport = SocketTransport(args.host, ports[dtype], timeout_s=300, max_frame_bytes=MAX_MESSAGE_BYTES)
        transport.wait_until_reachable(60)
        session = ClientSession(0, keys.identity, keys.server_key, max_message_bytes=MAX_MESSAGE_BYTES)
        link = ServerLink(transport, client_id=0, timeout_s=300, session=session, wire_dtype=dtype)
        link.handshake()
        info = link.hello(fingerprint(cfg), "bench")
        links[dtype] = link
        models[dtype] = SplitCausalLM(ClientBlocks(cfg.model, plan_for(cfg.model, cfg.split)), RemoteMiddle(link, server_info=info))
    for dtype in WIRE_DTYPES[1:]:
        models[dtype].load_state_dict(models[WIRE_DTYPES[0]].state_dict())  # one init (the servers' is seeded alike)
    cfg = _config("float32")
    models["centralized"] = FullCausalLM(build_full_model(cfg.model))
    for name, model in models.items():
        optimizers[name] = build_optimizer(model.parameters(), cfg.optim)

    ids, mask, targets = speed_batch(args.batch, args.seq)
    loss_fn = torch.nn.CrossEntropyLoss()
    total = args.warmup + args.steps

    def step(name: str, i: int) -> float:
        model, optimizer, link = models[name], optimizers[name], links.get(name)
        logits = model(ids, mask)
        loss = loss_fn(logits.view(-1, logits.shape[-1]), targets.view(-1))
        if link is not None:
            link.arm_step(client_step=i, total_steps=total)  # the server steps with this backward
        loss.backward()
        optimizer.step()
        if link is not None:
            link.step(client_step=i, total_steps=total)  # a no-op: it went with the backward
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    names = ["centralized", *WIRE_DTYPES]
    times: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, list[float]] = {n: [] for n in names}
    counted: dict[str, tuple[int, int]] = {}
    for i in range(total):
        if i == args.warmup:
            counted = {d: (links[d].messages, links[d].wire_bytes) for d in WIRE_DTYPES}
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:  # rotate the order: drift hits every variant alike
            started = time.perf_counter()
            losses[name].append(step(name, i))
            if i >= args.warmup:
                times[name].append(time.perf_counter() - started)
        print(f"[wan client] {args.rate} Mbit/s: step {i + 1}/{total}", file=sys.stderr, flush=True)
    per_step = {
        d: {"messages": (links[d].messages - counted[d][0]) / args.steps, "wire_bytes": (links[d].wire_bytes - counted[d][1]) / args.steps}
        for d in WIRE_DTYPES
    }
    for link in links.values():
        link.leave({})
    return {
        "rate_mbit": args.rate,
        "threads_per_process": torch.get_num_threads(),
        "step_s": {n: statistics.median(t) for n, t in times.items()},
        "per_step": per_step,
        "losses": losses,
    }


# --------------------------------------------------------------------- this process


def _time_at_rate(hosts: Any, rate: float, key_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start the server and the client on their hosts with the link at ``rate`` Mbit/s; the client's figures."""
    hosts.set_rate("client", rate)
    server_host, client_host = hosts["server"], hosts["client"]
    ports, result = work / f"ports-{rate:g}.json", work / f"result-{rate:g}.json"
    script = [sys.executable, str(Path(__file__).resolve())]
    common = [f"--key-dir={key_dir}", f"--ports={ports}", f"--host={server_host.address}"]
    logs = {name: (work / f"{name}-{rate:g}.log").open("w") for name in ("server", "client")}
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["server"] = subprocess.Popen(server_host.command([*script, "--serve", *common]), stdout=logs["server"], stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not ports.is_file():
            if procs["server"].poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"wan: error: the server did not start; its log:\n{(work / f'server-{rate:g}.log').read_text()[-3000:]}")
            time.sleep(0.2)
        client_args = [f"--rate={rate:g}", f"--steps={args.steps}", f"--warmup={args.warmup}", f"--batch={args.batch}", f"--seq={args.seq}", f"--result={result}"]
        procs["client"] = subprocess.Popen(client_host.command([*script, "--client", *common, *client_args]), stdout=logs["client"], stderr=subprocess.STDOUT)
        for name in ("client", "server"):
            try:
                code = procs[name].wait(timeout=WORKER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = None
            if code != 0:
                log = (work / f"{name}-{rate:g}.log").read_text()[-3000:]
                raise SystemExit(f"wan: error: the {name} at {rate:g} Mbit/s {'timed out' if code is None else f'exited {code}'}; its log:\n{log}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs.values():
            log.close()
    return json.loads(result.read_text())


def _client_main(args: argparse.Namespace) -> None:
    Path(args.result).write_text(json.dumps(_train(args)))


def _parity(args: argparse.Namespace, root: Path, record: dict[str, Any], save: Any) -> None:
    """Dev accuracy centralized and federated (2 clients) per wire dtype, with parity.py's runs."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import parity

    from flglm.benchmarking import find_data_dir

    data = find_data_dir(args.data, REPO_ROOT, ("train.tsv", "dev.tsv"), prog="wan")
    config = Path(args.parity_config).resolve()
    base = [f"data.train_path={data / 'train.tsv'}", f"data.dev_path={data / 'dev.tsv'}", "trainer.enable_progress_bar=false", *args.overrides]
    rows = parity._shared_rows(config, base, [2])
    base += [f"data.max_train_rows={rows}", "federation.num_clients=2"]
    record["parity_rows"] = rows
    print(f"[wan] parity: centralized on {rows} rows ...", file=sys.stderr, flush=True)
    shutil.rmtree(root / "parity", ignore_errors=True)  # this benchmark's own runs of before
    central = parity._run_centralized(config, base, root / "parity" / "centralized", args.timeout)
    record["parity"] = {"centralized_acc": central["val_acc"]}
    save()
    for dtype in args.parity_dtypes.split(","):
        print(f"[wan] parity: 2 clients, {dtype} wire ...", file=sys.stderr, flush=True)
        run_dir = root / "parity" / f"federated_2_{dtype}"
        federated = parity._run_federated(config, [*base, f"link.wire_dtype={dtype}"], 2, run_dir, args.timeout, 1)
        record["parity"][f"{dtype}_acc"] = federated["val_acc"]
        record["parity"][dtype] = federated["val_acc"] / central["val_acc"]
        print(f"[wan] parity {dtype}: {federated['val_acc']:.4f} / {central['val_acc']:.4f}", file=sys.stderr, flush=True)
        save()


def _plot(timing: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [t["rate_mbit"] for t in timing]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in ("centralized", *WIRE_DTYPES):
        style = {"color": "black", "linestyle": "--"} if name == "centralized" else {"marker": "o"}
        ax.plot(rates, [t["step_s"][name] * 1000 for t in timing], label=name if name == "centralized" else f"split, {name} wire", **style)
    ax.set_xscale("log")
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.set_xlabel("link speed (Mbit/s, tbf between two network namespaces)")
    ax.set_ylabel("training step (ms, median)")
    ax.set_title("GLM hidden 256, 6 layers, batch 16 x 64, encrypted", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(timing: list[dict[str, Any]]) -> list[str]:
    header = f"{'Mbit/s':>7} {'wire':<12}{'step ms':>9}{'ratio':>8}{'KB/step':>10}{'msgs/step':>10}"
    lines = [header, "-" * len(header)]
    for t in timing:
        central = t["step_s"]["centralized"]
        lines.append(f"{t['rate_mbit']:>7g} {'centralized':<12}{central * 1000:>9.1f}{1:>8}{'':>10}{'':>10}")
        for dtype in WIRE_DTYPES:
            s, p = t["step_s"][dtype], t["per_step"][dtype]
            lines.append(f"{'':>7} {dtype:<12}{s * 1000:>9.1f}{s / central:>8.3f}{p['wire_bytes'] / 1e3:>10.1f}{p['messages']:>10.2f}")
    return lines


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    timing = record["timing"]
    at = {t["rate_mbit"]: t for t in timing}
    ref = at.get(100.0) or timing[0]
    out: dict[str, Any] = {"benchmark": "wan", "model": "glm hidden 256, 6 layers", "batch": record["batch"], "seq": record["seq"]}
    for t in timing:
        for dtype in WIRE_DTYPES:
            out[f"ratio_{t['rate_mbit']:g}mbit_{dtype}"] = round(t["step_s"][dtype] / t["step_s"]["centralized"], 4)
    for dtype in WIRE_DTYPES[1:]:
        out[f"wire_bytes_ratio_{dtype}"] = round(ref["per_step"][dtype]["wire_bytes"] / ref["per_step"]["float32"]["wire_bytes"], 4)
    out["wire_bytes_per_step_float32"] = round(ref["per_step"]["float32"]["wire_bytes"])
    out["round_trips_per_step"] = max(p["messages"] for t in timing for p in t["per_step"].values())
    for key, value in record.get("parity", {}).items():
        if key in WIRE_DTYPES:
            out[f"parity_{key}"] = round(value, 4)
    if "parity_rows" in record:
        out["parity_rows"] = record["parity_rows"]
    out["wall_s"] = record.get("wall_s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="25,100,1000", help="comma-separated link speeds in Mbit/s (default 25,100,1000)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per rate (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--data", default="../shared/data/sst2", help="SST-2 directory (train.tsv, dev.tsv) for the parity runs")
    parser.add_argument("--parity-config", default=str(REPO_ROOT / "configs" / "sst2.yaml"))
    parser.add_argument("--parity-dtypes", default=",".join(WIRE_DTYPES), help="wire dtypes whose SST-2 parity is measured")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed for each parity run")
    parser.add_argument("--run-dir", default=str(REPO_ROOT / "runs" / "wan"))
    parser.add_argument("--figure", default=str(FIGURE), help=f"where the plot goes (default {FIGURE.relative_to(REPO_ROOT)}, the one BENCHMARKS.md shows)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--key-dir", "--ports", "--host", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for the parity runs")
    args = parser.parse_args()
    if args.serve:
        _serve(args)
        return
    if args.client:
        _client_main(args)
        return

    from flglm.crypto.keyring import generate_key_set
    from flglm.network_hosts import NetworkHosts, available

    try:
        rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        raise SystemExit(f"wan: error: --rates must be comma-separated numbers (Mbit/s), got {args.rates!r}") from None
    bad = [d for d in args.parity_dtypes.split(",") if d not in WIRE_DTYPES]
    if bad:
        raise SystemExit(f"wan: error: --parity-dtypes: {bad} are not wire dtypes {list(WIRE_DTYPES)}")
    ok, why = available()
    if not ok:
        raise SystemExit(f"wan: error: needs separate network hosts (Linux network namespaces): {why}")
    started = time.monotonic()
    root = Path(args.run_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    work = root / "timing"
    work.mkdir(exist_ok=True)
    key_dir = work / "keys"
    if not key_dir.is_dir():
        generate_key_set(key_dir, 1)
    record: dict[str, Any] = {"batch": args.batch, "seq": args.seq, "timing": []}

    def save() -> None:
        record["wall_s"] = round(time.monotonic() - started, 1)
        (root / "results.json").write_text(json.dumps(record, indent=1))

    with NetworkHosts(["server", "client"]) as hosts:
        for rate in rates:
            print(f"[wan] {rate:g} Mbit/s: timing ...", file=sys.stderr, flush=True)
            record["timing"].append(_time_at_rate(hosts, rate, key_dir, work, args))
            save()
            print("\n".join(_table(record["timing"][-1:])), file=sys.stderr, flush=True)
    _plot(record["timing"], Path(args.figure))
    if not args.skip_parity:
        _parity(args, root, record, save)
    save()
    print(f"Split training across two network hosts (encrypted socket link, tbf); {args.steps} timed steps per rate, 1 thread per side")
    print("\n".join(_table(record["timing"])))
    if "parity" in record:
        print(f"SST-2 parity, 2 clients, {record['parity_rows']} rows: " + ", ".join(f"{d} {v:.4f}" for d, v in record["parity"].items() if d in WIRE_DTYPES))
    print(f"plot: {args.figure}")
    print(json.dumps(_summary(record)))


if __name__ == "__main__":
    main()
