"""What the benchmarks in ``benchmarks/`` share: the model they time, and the centralized reference run.

Kept in the library (not beside the scripts) because the scripts run their parts in child
processes and under torchrun, where the installed package is what every process can import.
"""

from __future__ import annotations

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


def centralized_worker(config: str | Path, overrides: list[str]) -> None:
    """Child process of a benchmark: one centralized run on one thread; its metrics land in
    ``run_dir/centralized/metrics.json``."""
    import torch

    from flglm.config import load_config
    from flglm.runner import run_centralized, save_run_config, setup_logging

    torch.set_num_threads(1)
    cfg = load_config(config, overrides)
    setup_logging(Path(cfg.run_dir), "centralized")
    save_run_config(cfg)
    run_centralized(cfg)


def find_data_dir(data: str, repo_root: Path, needed: tuple[str, ...], *, prog: str) -> Path:
    """``data`` relative to the current directory, or else to the repository root; it must hold ``needed``."""
    candidates = list(dict.fromkeys([Path(data).resolve(), (repo_root / data).resolve()]))
    for candidate in candidates:
        if all((candidate / name).is_file() for name in needed):
            return candidate
    raise SystemExit(f"{prog}: error: --data {data}: no {' and '.join(needed)} in {' or '.join(map(str, candidates))}")
