"""What the benchmarks in ``benchmarks/`` share: the model they time, and the centralized reference run.

Kept in the library (not beside the scripts) because the scripts run their parts in child
processes and under torchrun, where the installed package is what every process can import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SPEED_MODEL: dict[str, Any] = {
    "model_type": "glm",
    "vocab_size": 2000,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
"""The GLM the speed benchmarks time (10M parameters; split 1 + 4 + 1 blocks, the middle is
most of the work). A copy is returned by :func:`speed_model`, so a script may edit it."""


def speed_model() -> dict[str, Any]:
    return dict(SPEED_MODEL)


def speed_batch(batch: int, seq: int) -> tuple[Any, Any, Any]:
    """The one batch the speed benchmarks train on, every step: (input ids, attention mask, targets), seeded."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, SPEED_MODEL["vocab_size"], (batch, seq), generator=gen)
    targets = torch.randint(4, SPEED_MODEL["vocab_size"], (batch, seq), generator=gen)
    return ids, torch.ones_like(ids), targets


def centralized_worker(config: str | Path, overrides: list[str]) -> None:
    """Child process of a benchmark: one centralized run on one thread; its metrics land in
    ``run_dir/centralized/metrics.json``."""
    import torch

    from flglm.config import load_config
    from flglm.jobs.logs import setup_logging
    from flglm.jobs.train import run_centralized, save_run_config

    torch.set_num_threads(1)
    cfg = load_config(config, overrides)
    setup_logging(Path(cfg.run_dir), "centralized")
    save_run_config(cfg)
    run_centralized(cfg)


def client_counts(text: str, *, prog: str) -> list[int]:
    """``--clients 1,2,4`` as sorted distinct counts; exits naming the flag if one is not a positive integer."""
    try:
        counts = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"{prog}: error: --clients must list positive counts, got {text!r}")
    return counts


def find_data_dir(data: str, repo_root: Path, needed: tuple[str, ...], *, prog: str) -> Path:
    """``data`` relative to the current directory, or else to the repository root; it must hold ``needed``."""
    candidates = list(dict.fromkeys([Path(data).resolve(), (repo_root / data).resolve()]))
    for candidate in candidates:
        if all((candidate / name).is_file() for name in needed):
            return candidate
    raise SystemExit(f"{prog}: error: --data {data}: no {' and '.join(needed)} in {' or '.join(map(str, candidates))}")


def run_centralized_child(
    script: str | Path, config: str | Path, overrides: list[str], run_dir: Path, *, timeout_s: float, prog: str
) -> dict[str, float]:
    """Run ``script --centralized-worker`` (which calls :func:`centralized_worker`) in a child
    process with a hard timeout; return its final metrics. Its output goes to ``run_dir/output.log``."""
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, str(script), "--centralized-worker", "--config", str(config), *overrides, f"run_dir={run_dir}"]
    output = run_dir / "output.log"
    with output.open("w") as sink:
        try:
            proc = subprocess.run(
                cmd, check=False, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=Path(script).resolve().parent.parent
            )
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{prog}: error: the centralized run took over {timeout_s:.0f}s; see {output}") from None
    if proc.returncode != 0:
        tail = "\n".join(output.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"{prog}: error: the centralized run exited with {proc.returncode}:\n{tail}")
    return json.loads((run_dir / "centralized" / "metrics.json").read_text())["metrics"]


def save_pretrained_base(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Turn a finished centralized run (full fine-tuning, no PEFT) into a Hugging Face model
    directory (config, safetensors, tokenizer) that ``model.path`` can name.

    Parameter-efficient methods adapt features a base model already has; with nothing to
    download here, a benchmark of them first pretrains its own small base this way."""
    from flglm.config import load_config
    from flglm.data import load_tokenizer
    from flglm.models import build_full_model
    from flglm.run_layout import tokenizer_dir
    from flglm.tensor_files import load_tensors

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.peft.method != "none":
        raise ValueError(f"{run_dir} trained with peft.method={cfg.peft.method}; a base comes from full training")
    model = build_full_model(cfg.model)
    model.load_state_dict(load_tensors(run_dir / "centralized" / "model.safetensors"))
    model.save_pretrained(out_dir)
    load_tokenizer(tokenizer_dir(run_dir)).save_pretrained(out_dir)
    return out_dir


def seal_open_ms(shape: tuple[int, ...], *, threads: int, pin_memory: bool = False, reps: int = 10) -> dict[str, float]:
    """Median milliseconds to seal and to open one bfloat16 message of ``shape`` with ``threads``
    sealing threads (:mod:`flglm.crypto.parallel`), as the link does it: a fresh message buffer
    each time (``pin_memory``: from torch's pinned host allocator, what a GPU side uses)."""
    import os
    import statistics
    import time

    import torch

    from flglm.crypto.channel import MessageHeader, SealedChannel

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        c2s, s2c, session = os.urandom(32), os.urandom(32), os.urandom(16)
        sender = SealedChannel(c2s, s2c, session, direction="c2s")
        receiver = SealedChannel(s2c, c2s, session, direction="s2c")
        payload = torch.randn(shape).to(torch.bfloat16)
        header = MessageHeader(client_id=0, kind="forward")
        seal, open_ = [], []
        for i in range(reps + 2):  # two warm-up rounds
            started = time.perf_counter()
            sealed = sender.seal(header, [payload], pin_memory=pin_memory)
            sealed_at = time.perf_counter()
            _, (opened,) = receiver.open(sealed, expect_kind="forward", max_bytes=sealed.numel(), pin_memory=pin_memory)
            done = time.perf_counter()
            if i >= 2:
                seal.append((sealed_at - started) * 1e3)
                open_.append((done - sealed_at) * 1e3)
            del sealed, opened
        return {"seal_ms": round(statistics.median(seal), 2), "open_ms": round(statistics.median(open_), 2)}
    finally:
        torch.set_num_threads(before)
