"""Cost of encryption: split-training step time sealed vs in the clear, bytes on the wire, AES-GCM speed.

    python benchmarks/crypto_overhead.py                 # GLM, hidden 256, 6 layers, batch 16 x 64 tokens
    python benchmarks/crypto_overhead.py --steps 40 --warmup 5

It starts two processes under torchrun (1 thread each, as a federation on a 2-core machine
would run). Rank 0 hosts three endpoints, each with its own middle stack built from the same
config: one in the clear, one that only accepts messages sealed under a client session
(X25519 handshake, AES-256-GCM), both over torch RPC, and a sealed one on an edge of the
socket link (``link.transport=socket``, :mod:`flglm.server.edge`, on 127.0.0.1). Rank 1
trains three identical split models, one through each, and times their steps interleaved (in
a rotating order, so drift and order effects hit all alike); the losses must be identical,
since encryption is lossless and both links carry the same sealed messages.

Also measured, in this process before the run: the bytes one sealed message of each kind of
a training step takes on the wire against its raw tensor bytes, and the throughput of
AES-GCM (``cryptography``) and of a whole ``SealedChannel.seal``/``open`` on this machine.

stdout is a table and, as its last line, one JSON object: ``ratio`` = sealed / plain median
step time (torch RPC), ``socket_over_rpc`` = sealed over the socket link / sealed over torch
RPC, ``wire_overhead_bytes`` = the largest per-message overhead of any message kind.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # runs from a checkout without `pip install -e .`, here and under torchrun
    sys.path.insert(0, str(REPO_ROOT))

from flglm.benchmarking import speed_batch, speed_model

MODEL = speed_model()
VARIANTS = ("plain", "sealed", "socket")
"""In the clear over torch RPC; sealed over torch RPC; sealed over the socket link."""
RATIO_GOAL = 1.05
WIRE_GOAL_BYTES = 64
MAX_MESSAGE_BYTES = 1 << 30
IDENTICAL_LOSS_STEPS = 3
"""The first steps whose losses must be bit-identical with and without encryption."""
LONG_RUN_COUNTER = 2**14
"""Per-kind sizes are taken after this many messages, and with a request id of 2**20: the
header's varints are then as long as in any session of up to ~2 million messages per
direction (3 bytes each), not the shorter ones of a session's first messages."""
LONG_RUN_STEP = 2**20


def _config():
    from flglm.config import ModelConfig, RunConfig

    cfg = RunConfig()
    cfg.model = ModelConfig(config=dict(MODEL))
    cfg.data.train_path = "unused"
    cfg.federation.num_clients = 1
    cfg.crypto.secure_aggregation = False  # no aggregation here; keep the server's state minimal
    return cfg


# --------------------------------------------------------------------- server (rank 0)

_ENDPOINTS: dict = {}


def endpoint_for(name: str):
    """The endpoint ``name`` ("plain" or "sealed") of the server process, for ``rpc.remote``."""
    return _ENDPOINTS[name]


def _serve(key_dir: Path, edge_file: Path, opts) -> None:
    from torch.distributed import rpc

    from flglm.crypto.keyring import load_server_keys
    from flglm.crypto.sessions import ServerSessions
    from flglm.server.edge import Edge
    from flglm.server.endpoint import ServerEndpoint
    from flglm.server.middle_server import MiddleServer

    cfg = _config()
    keys = load_server_keys(key_dir, 1)

    def sessions() -> ServerSessions:
        return ServerSessions(keys.identity, {0: keys.client_keys[0]}, max_message_bytes=MAX_MESSAGE_BYTES)

    servers = {name: MiddleServer(cfg) for name in VARIANTS}
    _ENDPOINTS["plain"] = ServerEndpoint(servers["plain"])
    _ENDPOINTS["sealed"] = ServerEndpoint(servers["sealed"], sessions())
    edge = Edge(
        ServerEndpoint(servers["socket"], sessions()), host="127.0.0.1", port=0, encrypted=True, max_frame_bytes=MAX_MESSAGE_BYTES,
        first_frame_timeout_s=30, call_timeout_s=300, max_connections=8, max_connections_per_client=2,
    )  # fmt: skip
    host, port = edge.start()
    edge_file.write_text(f"{host}:{port}")
    rpc.init_rpc("server", rank=0, world_size=2, rpc_backend_options=opts)
    for server in servers.values():
        server.wait_until_done(timeout=600)
    edge.close()
    rpc.shutdown()


# --------------------------------------------------------------------- client (rank 1)


def _train(args: argparse.Namespace, opts) -> dict:
    import torch
    from torch.distributed import rpc

    from flglm.client.lm import SplitCausalLM
    from flglm.client.remote import RemoteMiddle
    from flglm.client.server_link import ServerLink
    from flglm.config import fingerprint
    from flglm.crypto.keyring import load_client_keys
    from flglm.crypto.sessions import ClientSession
    from flglm.link.socket_transport import SocketTransport
    from flglm.models.split import ClientBlocks, plan_for
    from flglm.optim import build_optimizer

    cfg = _config()
    keys = load_client_keys(args.key_dir, 0, 1)
    rpc.init_rpc("client0", rank=1, world_size=2, rpc_backend_options=opts)

    def session() -> ClientSession:
        return ClientSession(0, keys.identity, keys.server_key, max_message_bytes=MAX_MESSAGE_BYTES)

    edge_file = Path(args.edge_file)
    while not edge_file.is_file():  # written before the server's init_rpc, which this one's waited for
        time.sleep(0.05)
    host, port = edge_file.read_text().rsplit(":", 1)
    socket_transport = SocketTransport(host, int(port), timeout_s=300, max_frame_bytes=MAX_MESSAGE_BYTES)
    sessions = {"sealed": session(), "socket": session()}
    links = {
        "plain": ServerLink(rpc.remote("server", endpoint_for, args=("plain",)), client_id=0, timeout_s=300),
        "sealed": ServerLink(rpc.remote("server", endpoint_for, args=("sealed",)), client_id=0, timeout_s=300, session=sessions["sealed"]),
        "socket": ServerLink(socket_transport, client_id=0, timeout_s=300, session=sessions["socket"]),
    }
    links["sealed"].handshake()
    links["socket"].handshake()
    plan = plan_for(cfg.model, cfg.split)
    models = {}
    for name, link in links.items():
        info = link.hello(fingerprint(cfg), "bench")
        models[name] = SplitCausalLM(ClientBlocks(cfg.model, plan), RemoteMiddle(link, server_info=info))
    for name in VARIANTS[1:]:
        models[name].load_state_dict(models["plain"].state_dict())  # identical init (the servers' is seeded by name)
    optimizers = {name: build_optimizer(model.parameters(), cfg.optim) for name, model in models.items()}

    ids, mask, targets = speed_batch(args.batch, args.seq)
    loss_fn = torch.nn.CrossEntropyLoss()
    total = args.warmup + args.steps

    def step(name: str, i: int) -> torch.Tensor:
        model, opt = models[name], optimizers[name]
        logits = model(ids, mask)
        loss = loss_fn(logits.view(-1, logits.shape[-1]), targets.view(-1))
        loss.backward()
        opt.step()
        links[name].step(client_step=i, total_steps=total)
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    losses: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for i in range(total):
        shift = i % len(VARIANTS)
        for name in VARIANTS[shift:] + VARIANTS[:shift]:
            started = time.perf_counter()
            loss = step(name, i)
            elapsed = time.perf_counter() - started
            losses[name].append(loss.item())
            if i >= args.warmup:
                times[name].append(elapsed)
        if i < IDENTICAL_LOSS_STEPS:
            assert losses["plain"][i] == losses["sealed"][i] == losses["socket"][i], (
                f"step {i}: loss {losses['sealed'][i]!r} with encryption (socket link: {losses['socket'][i]!r}) != {losses['plain'][i]!r} without"
            )

    counters = {name: {"messages": link.messages, "payload_bytes": link.payload_bytes, "wire_bytes": link.wire_bytes} for name, link in links.items()}
    for link in links.values():
        link.leave({})
    rpc.shutdown()
    return {
        "threads_per_process": torch.get_num_threads(),
        "times": times,
        "losses": losses,
        "counters": counters,
        "handshakes": sessions["sealed"].handshakes,
    }


def _worker(args: argparse.Namespace) -> None:
    from flglm.distributed import configure_threads, read_env, rpc_options

    env = read_env()
    configure_threads(env.local_world_size)
    opts = rpc_options(num_worker_threads=8, timeout_s=300)
    if env.rank == 0:
        _serve(Path(args.key_dir), Path(args.edge_file), opts)
        return
    result = _train(args, opts)
    Path(args.result).write_text(json.dumps(result))


# --------------------------------------------------------------------- this process: sizes and throughput


def _message_sizes(batch: int, seq: int) -> dict[str, dict[str, int]]:
    """Raw and sealed bytes of one message of each kind of a training step, late in a long session."""
    import torch

    from flglm.crypto.channel import MessageHeader
    from flglm.crypto.handshake import SessionKeys
    from flglm.link.protocol import autocast_code, step_control

    hidden = MODEL["hidden_size"]
    keys = SessionKeys(os.urandom(32), os.urandom(32), os.urandom(16))
    channels = {"c2s": keys.client_channel(), "s2c": keys.server_channel()}
    for channel in channels.values():
        for _ in range(LONG_RUN_COUNTER):
            channel.seal(MessageHeader(client_id=0, kind="test"), [])
    states = torch.randn(batch, seq, hidden)
    crossing = [states, torch.ones(batch, seq, dtype=torch.int64), torch.arange(seq).unsqueeze(0), autocast_code("")]
    messages = {
        "forward": ("c2s", crossing, LONG_RUN_STEP),
        "output": ("s2c", [states], LONG_RUN_STEP),
        "backward": ("c2s", [states], LONG_RUN_STEP),
        "grad_in": ("s2c", [states], LONG_RUN_STEP),
        "step": ("c2s", [step_control(LONG_RUN_STEP, 2 * LONG_RUN_STEP, 1.0, None)], 0),
        "ack": ("s2c", [], 0),
    }
    sizes = {}
    for kind, (direction, tensors, step) in messages.items():
        sealed = channels[direction].seal(MessageHeader(client_id=0, kind=kind, step=step), tensors)
        raw = sum(t.numel() * t.element_size() for t in tensors)
        sizes[kind] = {"raw": raw, "wire": sealed.numel(), "overhead": sealed.numel() - raw}
    return sizes


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def _throughput() -> dict[str, float]:
    """GB/s (1e9 bytes per second), best of several repeats, on one thread."""
    import torch
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from flglm.crypto.channel import MessageHeader
    from flglm.crypto.handshake import SessionKeys

    out: dict[str, float] = {}
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    nonce, aad = os.urandom(12), os.urandom(32)
    for label, size, repeats in (("1mib", 1 << 20, 30), ("16mib", 16 << 20, 8)):
        data = os.urandom(size)
        sealed = aead.encrypt(nonce, data, aad)
        out[f"aes_gcm_encrypt_{label}_gbps"] = size / _best(lambda data=data: aead.encrypt(nonce, data, aad), repeats) / 1e9
        out[f"aes_gcm_decrypt_{label}_gbps"] = size / _best(lambda sealed=sealed: aead.decrypt(nonce, sealed, aad), repeats) / 1e9

    keys = SessionKeys(os.urandom(32), os.urandom(32), os.urandom(16))
    sender, receiver = keys.client_channel(), keys.server_channel()
    tensor = torch.randn((1 << 20) // 4)
    header = MessageHeader(client_id=0, kind="forward")
    seal_best = open_best = float("inf")
    for _ in range(30):  # each message is opened once, in order, so seal and open alternate
        started = time.perf_counter()
        message = sender.seal(header, [tensor])
        seal_best = min(seal_best, time.perf_counter() - started)
        started = time.perf_counter()
        _, (opened,) = receiver.open(message, expect_kind="forward", max_bytes=MAX_MESSAGE_BYTES)
        open_best = min(open_best, time.perf_counter() - started)
    assert torch.equal(opened, tensor)
    out["channel_seal_1mib_gbps"] = (1 << 20) / seal_best / 1e9
    out["channel_open_1mib_gbps"] = (1 << 20) / open_best / 1e9
    return out


# --------------------------------------------------------------------- report


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _report(args: argparse.Namespace, run: dict, sizes: dict, speed: dict) -> dict:
    plain = statistics.median(run["times"]["plain"])
    sealed = statistics.median(run["times"]["sealed"])
    socket_step = statistics.median(run["times"]["socket"])
    ratio = sealed / plain
    socket_ratio = socket_step / sealed
    losses = run["losses"]
    identical_steps = sum(a == b for a, b in zip(losses["plain"], losses["sealed"]))
    socket_identical = sum(a == b for a, b in zip(losses["sealed"], losses["socket"]))
    max_loss_diff = max(abs(a - b) for a, b in zip(losses["plain"], losses["sealed"]))
    wire_overhead = max(s["overhead"] for s in sizes.values())
    link = run["counters"]["sealed"]
    link_avg = (link["wire_bytes"] - link["payload_bytes"]) / link["messages"] / 2
    plain_link = run["counters"]["plain"]
    # Every message of a step is sealed once and opened once, on the step's critical path.
    step_bytes = sum(s["raw"] for s in sizes.values())
    crypto_ms = step_bytes / 1e9 * (1 / speed["channel_seal_1mib_gbps"] + 1 / speed["channel_open_1mib_gbps"]) * 1000

    width = 44
    timed_losses = min(IDENTICAL_LOSS_STEPS, len(losses["plain"]))
    plain_link_avg = (plain_link["wire_bytes"] - plain_link["payload_bytes"]) / plain_link["messages"] / 2
    lines = [
        (
            f"Encryption overhead: GLM hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} blocks (1 + 4 + 1), "
            f"batch {args.batch} x {args.seq}, {run['threads_per_process']} thread per process, "
            f"{args.steps} steps timed after {args.warmup} warm-up, interleaved"
        ),
        "",
        f"{'split training step (median)':<{width}}{'plain':>11}{'sealed':>11}{'ratio':>8}   goal",
        f"{'  step time':<{width}}{plain * 1000:>8.1f} ms{sealed * 1000:>8.1f} ms{ratio:>8.3f}   <= {RATIO_GOAL}  {_met(ratio <= RATIO_GOAL)}",
        f"{'  added per step':<{width}}{(sealed - plain) * 1000:>+19.1f} ms   (expected from the seal/open speed below: {crypto_ms:.1f} ms)",
        (
            f"{'  sealed, socket link / torch RPC':<{width}}{sealed * 1000:>8.1f} ms{socket_step * 1000:>8.1f} ms{socket_ratio:>8.3f}"
            f"   <= {RATIO_GOAL}  {_met(socket_ratio <= RATIO_GOAL)}"
        ),
        (
            f"  losses identical on the first {timed_losses} steps (asserted): yes; "
            f"on {identical_steps} of {len(losses['plain'])} steps (largest difference {max_loss_diff:.3g}); "
            f"socket link == torch RPC, sealed, on {socket_identical} of {len(losses['socket'])}"
        ),
        "",
        f"{f'bytes per message ({LONG_RUN_COUNTER}th of a session)':<{width}}{'raw':>11}{'on the wire':>13}{'overhead':>10}   goal",
    ]
    for kind, s in sizes.items():
        direction = "client -> server" if kind in ("forward", "backward", "step") else "server -> client"
        lines.append(
            f"{f'  {kind} ({direction})':<{width}}{s['raw']:>11,}{s['wire']:>13,}{s['overhead']:>10}"
            f"   <= {WIRE_GOAL_BYTES}  {_met(s['overhead'] <= WIRE_GOAL_BYTES)}"
        )
    lines += [
        (
            f"{'  whole run, sealed link counters':<{width}}{link['payload_bytes']:>11,}{link['wire_bytes']:>13,}"
            f"{link_avg:>10.1f}   (average per message, {link['messages']} exchanges)"
        ),
        f"{'  whole run, plain link counters':<{width}}{plain_link['payload_bytes']:>11,}{plain_link['wire_bytes']:>13,}{plain_link_avg:>10.1f}",
        "",
        f"{'AES-256-GCM on this machine (best of repeats)':<{width}}{'encrypt':>11}{'decrypt':>11}",
        f"{'  1 MiB':<{width}}{speed['aes_gcm_encrypt_1mib_gbps']:>6.2f} GB/s{speed['aes_gcm_decrypt_1mib_gbps']:>6.2f} GB/s",
        f"{'  16 MiB':<{width}}{speed['aes_gcm_encrypt_16mib_gbps']:>6.2f} GB/s{speed['aes_gcm_decrypt_16mib_gbps']:>6.2f} GB/s",
        (
            f"{'  SealedChannel seal / open, 1 MiB float32':<{width}}"
            f"{speed['channel_seal_1mib_gbps']:>6.2f} GB/s{speed['channel_open_1mib_gbps']:>6.2f} GB/s"
        ),
    ]
    print("\n".join(lines))
    return {
        "benchmark": "crypto_overhead",
        "model": "glm hidden 256, 6 layers (1 + 4 + 1)",
        "batch": args.batch,
        "seq": args.seq,
        "threads_per_process": run["threads_per_process"],
        "steps_timed": args.steps,
        "warmup": args.warmup,
        "plain_step_s": round(plain, 4),
        "sealed_step_s": round(sealed, 4),
        "ratio": round(ratio, 4),
        "ratio_goal": RATIO_GOAL,
        "socket_step_s": round(socket_step, 4),
        "socket_over_rpc": round(socket_ratio, 4),
        "socket_losses_identical_steps": socket_identical,
        "added_ms_per_step": round((sealed - plain) * 1000, 2),
        "estimated_crypto_ms_per_step": round(crypto_ms, 2),
        "losses_identical_first_steps": timed_losses,
        "losses_identical_steps": identical_steps,
        "max_loss_diff": max_loss_diff,
        "wire_overhead_bytes": wire_overhead,
        "wire_overhead_goal_bytes": WIRE_GOAL_BYTES,
        "wire_by_kind": sizes,
        "link_avg_overhead_bytes": round(link_avg, 2),
        "link_messages": link["messages"],
        "handshakes": run["handshakes"],
        **{k: round(v, 3) for k, v in speed.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--key-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--edge-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")

    import torch

    from flglm.crypto.keyring import generate_key_set
    from flglm.jobs.subprocesses import FederationFailed, run_torchrun

    torch.set_num_threads(1)  # as in each process of the federation, where sealing runs
    sizes = _message_sizes(args.batch, args.seq)
    speed = _throughput()
    with tempfile.TemporaryDirectory(prefix="flglm-crypto-bench-") as tmp:
        key_dir, result = Path(tmp) / "keys", Path(tmp) / "result.json"
        generate_key_set(key_dir, 1)
        worker_args = ["--worker", f"--key-dir={key_dir}", f"--result={result}", f"--edge-file={Path(tmp) / 'edge'}"]
        worker_args += [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--batch={args.batch}", f"--seq={args.seq}"]
        try:
            run_torchrun(Path(__file__), worker_args, nproc=2, timeout_s=1800, extra_env={"PYTHONWARNINGS": "ignore"})
        except FederationFailed as exc:
            sys.stderr.write(f"{exc}\n")
            sys.exit(1)
        run = json.loads(result.read_text())
    print(json.dumps(_report(args, run, sizes, speed)))


if __name__ == "__main__":
    main()
