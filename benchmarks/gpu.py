"""The split on one GPU: equivalence on CUDA, a 7B-shaped Llama's split step vs centralized,
client batching vs sequential serving, and each side's peak device memory.

    python benchmarks/gpu.py --out runs/gpu                  # one GPU, unattended, <= 8 min
    python benchmarks/gpu.py --tiny --device cpu --out /tmp/gpu   # a small model, a few steps (tests/test_gpu_benchmark.py)

Everything runs in this one process: the client blocks and the server's middle stack share the
device, and the link between them is the real one, sealed (X25519 + AES-256-GCM) over a
``LocalTransport`` to a ``ServerEndpoint``, so each crossing pays the device-to-host copy and the
encryption a real deployment pays (not the network).

1. Equivalence (a small Llama, hidden 256, 4 blocks, LoRA r=8): split logits == whole model,
   then 3 AdamW steps of a 1-client federation == centralized per-step losses; float32 with
   ``torch.use_deterministic_algorithms(True)`` and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, atol
   1e-5; bfloat16 frozen weights (adapters float32), atol 1e-2 (on CPU both are measured equal:
   tests/test_devices.py, tests/test_lora.py).
2. Memory (the 7B shape: hidden 4096, 32 blocks, intermediate 11008, 32 heads, vocabulary
   32000, random init, frozen weights bf16, LoRA r=8 on every linear layer, split 1 + 30 + 1):
   peak ``torch.cuda.max_memory_allocated`` of building and training one step of the middle
   stack alone, of one client's blocks alone, and of the whole model, batch 8 x 512.
3. Step time: median of the split step (client forward, sealed crossing, middle, client
   backward, sealed gradient, both optimizers) vs the centralized step of the whole model.
4. Throughput of 4 clients (threads, one link each) served ``sequential`` vs ``client_batching``.
5. Sealing one 7B crossing (8 x 512 x 4096 bf16): 1 thread vs all, pageable vs pinned buffers
   (``flglm.benchmarking.seal_open_ms``; on a CPU: ``benchmarks/seal_threads.py``).

Each figure is appended to ``--out/gpu.jsonl`` as soon as it is measured (a run cut short keeps
what it had). The last stdout line is one JSON object with ``split_ratio`` (split / centralized
step time), ``batching_speedup`` (client_batching / sequential samples per second),
``server_peak_gb``, ``client_peak_gb`` (and ``full_peak_gb``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: deterministic cuBLAS
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch

LLAMA_7B = {
    "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096, "pad_token_id": 0,
}  # fmt: skip
SMALL_LLAMA = {
    "model_type": "llama", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 256, "pad_token_id": 0,
}  # fmt: skip
TINY_LLAMA = {**SMALL_LLAMA, "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "head_dim": 16}
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}
GIB = 2**30


class Results:
    """Prints each result and appends it to ``out/gpu.jsonl`` at once."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "gpu.jsonl"
        self.path.write_text("")
        self.started = time.monotonic()

    def add(self, record: dict[str, Any]) -> None:
        record = {"t_s": round(time.monotonic() - self.started, 1), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def make_cfg(model: dict[str, Any], dtype: str, clients: int = 1, mode: str = "sequential"):
    from flglm.config import ModelConfig, RunConfig

    cfg = RunConfig()
    cfg.model = ModelConfig(config=dict(model), dtype=dtype)
    cfg.data.train_path = "unused"
    cfg.peft.method, cfg.peft.lora_r = "lora", 8
    cfg.federation.num_clients = clients
    cfg.server.parallelism = mode
    cfg.server.max_clients_per_batch = clients
    cfg.server.batch_window_ms = 1000.0
    cfg.crypto.secure_aggregation = False
    return cfg


def batch(model: dict[str, Any], rows: int, length: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model["vocab_size"], (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, length // 2 :] = 0  # one right-padded row
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


class Federation:
    """A sealed in-process federation: one MiddleServer over ``middle``, ``clients`` linked clients."""

    def __init__(self, cfg, middle, blocks: list, key_dir: Path) -> None:
        from flglm.client.lm import SplitCausalLM
        from flglm.client.remote import RemoteMiddle
        from flglm.client.server_link import ServerLink
        from flglm.config import fingerprint
        from flglm.crypto.keyring import load_client_keys, load_server_keys
        from flglm.crypto.sessions import ClientSession, ServerSessions
        from flglm.link.transport import LocalTransport
        from flglm.server.endpoint import ServerEndpoint
        from flglm.server.middle_server import MiddleServer

        n = len(blocks)
        keys = load_server_keys(key_dir, n)
        self.server = MiddleServer(cfg, middle=middle, clients=list(range(n)), mode=cfg.server.parallelism)
        pinned = middle.device.type == "cuda"  # what serve.py / train.py set on a GPU side
        sessions = ServerSessions(keys.identity, keys.client_keys, max_message_bytes=1 << 34, pin_memory=pinned)
        endpoint = ServerEndpoint(self.server, sessions)
        self.lms = []
        for i, b in enumerate(blocks):
            mine = load_client_keys(key_dir, i, n)
            session = ClientSession(i, mine.identity, mine.server_key, max_message_bytes=1 << 34, pin_memory=b.device.type == "cuda")
            link = ServerLink(LocalTransport(endpoint), client_id=i, timeout_s=600.0, session=session)
            link.handshake()
            info = link.hello(fingerprint(cfg), "gpu-benchmark")
            self.lms.append(SplitCausalLM(b, RemoteMiddle(link, server_info=info)))
        self.optimizers = [torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=cfg.optim.lr) for lm in self.lms]

    def step(self, i: int, ids: torch.Tensor, mask: torch.Tensor, step: int, total: int) -> float:
        lm, optimizer = self.lms[i], self.optimizers[i]
        loss = lm_loss(lm(ids, mask), ids, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lm.link.step(client_step=step, total_steps=total)
        return loss.item()

    def close(self) -> None:
        for lm in self.lms:
            lm.link.leave({})
        self.server.close()


def centralized_step(full, optimizer, ids: torch.Tensor, mask: torch.Tensor) -> float:
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    loss = lm_loss(full(input_ids=ids, attention_mask=mask, position_ids=pos).logits, ids, mask)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / GIB, 2)
    from flglm.devices import peak_memory

    return round(peak_memory()["peak_host_mb"] / 1024, 2)  # CPU: the process's peak RSS so far (not per side)


def equivalence(results: Results, model: dict[str, Any], device: torch.device, key_dir: Path, steps: int) -> None:
    """Part 1: split == whole model, 1-client federation == centralized, float32 and bfloat16."""
    from flglm.models import ClientBlocks, MiddleStack
    from flglm.models.split import build_side, plan_for

    for dtype in ("float32", "bfloat16"):
        torch.use_deterministic_algorithms(dtype == "float32", warn_only=True)
        cfg = make_cfg(model, dtype)
        plan = plan_for(cfg.model, cfg.split)
        fed = Federation(
            cfg, MiddleStack(cfg.model, plan, cfg.peft, device=device), [ClientBlocks(cfg.model, plan, cfg.peft, device=device)], key_dir
        )
        full = build_side(cfg.model, None, "full", cfg.peft, device=device)
        optimizer = torch.optim.AdamW([p for p in full.parameters() if p.requires_grad], lr=cfg.optim.lr)
        ids, mask = batch(model, 4, 32, device)
        with torch.no_grad():
            pos = torch.arange(ids.shape[1], device=device).expand_as(ids)
            logit_err = float((fed.lms[0](ids, mask).float() - full(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()).abs().max())
        fed_losses = [fed.step(0, ids, mask, s, steps) for s in range(steps)]
        central_losses = [centralized_step(full, optimizer, ids, mask) for _ in range(steps)]
        loss_err = max(abs(a - b) for a, b in zip(fed_losses, central_losses, strict=True))
        fed.close()
        tol = TOLERANCE[dtype]
        results.add({"part": "equivalence", "dtype": dtype, "device": str(device), "split_vs_full_logits_max_err": logit_err,
                     "fed_vs_central_loss_max_err": loss_err, "atol": tol, "ok": logit_err <= tol and loss_err <= tol})  # fmt: skip
        del fed, full, optimizer
    torch.use_deterministic_algorithms(False)


def crossing_seal(results: Results, shape: tuple[int, int, int], device: torch.device) -> None:
    """Part 5: sealing and opening one crossing, 1 thread vs this host's threads, pageable vs pinned buffers."""
    from flglm.benchmarking import seal_open_ms

    for threads in sorted({1, torch.get_num_threads()}):
        for pinned in (False, True) if device.type == "cuda" else (False,):
            times = seal_open_ms(shape, threads=threads, pin_memory=pinned)
            results.add({"part": "crossing_seal", "shape": list(shape), "threads": threads, "pinned": pinned, **times})


def side_peak(results: Results, what: str, build, run, device: torch.device) -> tuple[Any, float]:
    """Build one side and train it one step alone; its peak device memory (GiB)."""
    reset_peak(device)
    started = time.monotonic()
    module = build()
    built_s = time.monotonic() - started
    run(module)
    sync(device)
    peak = peak_gb(device)
    results.add({"part": "memory", "side": what, "peak_gb": peak, "build_s": round(built_s, 1)})
    return module, peak


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu"))
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="a small model and a few steps (runs on a CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 5; --tiny 2)")
    parser.add_argument("--batch", type=int, default=None, help="rows per client batch (default 8; --tiny 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default 512; --tiny 16)")
    args = parser.parse_args(argv)
    from flglm.crypto.keyring import generate_key_set
    from flglm.devices import resolve_device
    from flglm.link.crossing import Crossing
    from flglm.models import ClientBlocks, MiddleStack
    from flglm.models.split import build_side, plan_for

    device = resolve_device(args.device, key="--device")
    model, small = (TINY_LLAMA, TINY_LLAMA) if args.tiny else (LLAMA_7B, SMALL_LLAMA)
    steps = args.steps or (2 if args.tiny else 5)
    rows, length = args.batch or (2 if args.tiny else 8), args.seq or (16 if args.tiny else 512)
    results = Results(args.out)
    results.add({"part": "setup", "device": str(device), "model": model, "batch": [rows, length], "steps": steps,
                 "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None})  # fmt: skip
    key_dir = Path(tempfile.mkdtemp(prefix="gpu-bench-keys-"))
    generate_key_set(key_dir, num_clients=4)

    equivalence(results, small, device, key_dir, steps=3)
    crossing_seal(results, (args.batch or (2 if args.tiny else 8), args.seq or (16 if args.tiny else 512), model["hidden_size"]), device)

    cfg = make_cfg(model, "bfloat16")
    plan = plan_for(cfg.model, cfg.split)
    ids, mask = batch(model, rows, length, device)
    hidden = cfg.model.config["hidden_size"]

    def middle_step(middle) -> None:
        x = torch.randn(rows, length, hidden, dtype=torch.bfloat16, requires_grad=True)  # as it arrives: on the CPU
        out = middle(x, mask.cpu(), torch.arange(length).expand(rows, length))
        out.backward(torch.randn_like(out))
        torch.optim.AdamW([p for p in middle.parameters() if p.requires_grad]).step()

    def client_step(blocks) -> None:
        crossing = blocks.input_block(ids, mask)
        loss = lm_loss(blocks.output_block(Crossing(crossing.hidden * 1.0, crossing.attention_mask, crossing.position_ids)), ids, mask)
        loss.backward()
        torch.optim.AdamW([p for p in blocks.parameters() if p.requires_grad]).step()

    middle, server_peak = side_peak(
        results, "server middle stack", lambda: MiddleStack(cfg.model, plan, cfg.peft, device=device), middle_step, device
    )
    middle.zero_grad(set_to_none=True)
    client0, client_peak = side_peak(results, "one client", lambda: ClientBlocks(cfg.model, plan, cfg.peft, device=device), client_step, device)
    client0.zero_grad(set_to_none=True)

    # Part 3: the sealed split step
    fed = Federation(cfg, middle, [client0], key_dir)
    for s in range(2):
        fed.step(0, ids, mask, s, 2 + steps)
    times = []
    for s in range(steps):
        sync(device)
        started = time.perf_counter()
        fed.step(0, ids, mask, 2 + s, 2 + steps)
        sync(device)
        times.append(time.perf_counter() - started)
    fed.close()
    split_s = statistics.median(times)
    results.add({"part": "step_time", "what": "split (sealed link)", "median_s": round(split_s, 4), "steps_s": [round(t, 4) for t in times]})

    # Part 4: 4 clients, sequential vs client batching
    clients = [client0, *(ClientBlocks(cfg.model, plan, cfg.peft, device=device) for _ in range(3))]
    throughput = {}
    for mode in ("sequential", "client_batching"):
        fed = Federation(make_cfg(model, "bfloat16", clients=4, mode=mode), middle, clients, key_dir)
        errors: list[Exception] = []

        def train(i: int, fed: Federation = fed, errors: list = errors) -> None:
            try:
                for s in range(steps + 1):
                    fed.step(i, ids, mask, s, steps + 1)
            except Exception as err:  # noqa: BLE001 -- re-raised below, not lost in the thread
                errors.append(err)

        threads = [threading.Thread(target=train, args=(i,)) for i in range(4)]
        sync(device)
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sync(device)
        elapsed = time.perf_counter() - started
        fed.close()
        if errors:
            raise errors[0]
        throughput[mode] = 4 * (steps + 1) * rows / elapsed
        results.add({"part": "federation", "mode": mode, "clients": 4, "samples_per_s": round(throughput[mode], 3), "elapsed_s": round(elapsed, 2)})
    del fed, clients, client0, middle

    # Part 2 (reference): the whole model, its peak and its step
    def whole_step(full) -> None:
        centralized_step(full, torch.optim.AdamW([p for p in full.parameters() if p.requires_grad]), ids, mask)

    full, full_peak = side_peak(results, "whole model", lambda: build_side(cfg.model, None, "full", cfg.peft, device=device), whole_step, device)
    optimizer = torch.optim.AdamW([p for p in full.parameters() if p.requires_grad], lr=cfg.optim.lr)
    for _ in range(2):
        centralized_step(full, optimizer, ids, mask)
    times = []
    for _ in range(steps):
        sync(device)
        started = time.perf_counter()
        centralized_step(full, optimizer, ids, mask)
        sync(device)
        times.append(time.perf_counter() - started)
    central_s = statistics.median(times)
    results.add({"part": "step_time", "what": "centralized", "median_s": round(central_s, 4), "steps_s": [round(t, 4) for t in times]})

    summary = {
        "split_ratio": round(split_s / central_s, 3),
        "batching_speedup": round(throughput["client_batching"] / throughput["sequential"], 3),
        "server_peak_gb": server_peak,
        "client_peak_gb": client_peak,
        "full_peak_gb": full_peak,
    }
    results.add({"part": "summary", **summary})
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
