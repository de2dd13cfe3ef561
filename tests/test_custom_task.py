"""The README's "Writing your own task" guide, run as written: its module and its config.

The code and YAML blocks are read out of README.md, so the guide cannot drift from what works.
A one-client federation (torchrun, encryption) with the task must equal the centralized run.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import yaml

from flglm.config import load_config
from flglm.jobs.subprocesses import run_federation
from tests.test_federation import write_config

README = Path(__file__).resolve().parent.parent / "README.md"


def _guide_blocks() -> tuple[str, dict]:
    section = README.read_text().split("## Writing your own task", 1)[1].split("\n## ", 1)[0]
    python = next(b for b in re.findall(r"```python\n(.*?)```", section, re.DOTALL) if b.startswith("# my_tasks.py"))
    (config,) = re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)
    return python, yaml.safe_load(config)


def _spam_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    spam = ["win", "a", "free", "prize", "now", "click", "cash", "offer"]
    ham = ["the", "meeting", "is", "moved", "to", "lunch", "report", "tomorrow"]
    rows = []
    for i in range(n):
        words = spam if i % 2 else ham
        rows.append({"message": " ".join(rng.choice(words) for _ in range(rng.randint(3, 8))), "spam": i % 2})
    return rows


@pytest.mark.multiprocess
def test_readme_task_guide_runs_split_and_centralized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    python, guide = _guide_blocks()
    (tmp_path / "my_tasks.py").write_text(python)
    for name, n in (("train", 64), ("dev", 32)):
        (tmp_path / "spam").mkdir(exist_ok=True)
        (tmp_path / "spam" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _spam_rows(n, seed=len(name))))
    data = {**guide["data"], "train_path": str(tmp_path / "spam/train.jsonl"), "dev_path": str(tmp_path / "spam/dev.jsonl")}
    config = write_config(tmp_path, data=data, task=guide["task"], trainer={"max_steps": 12, "max_epochs": 2})

    run_federation(config, num_clients=1, run_dir=tmp_path / "fed", timeout_s=240, extra_env={"PYTHONPATH": str(tmp_path)})
    monkeypatch.syspath_prepend(str(tmp_path))
    from flglm.jobs.train import run_centralized

    cfg = load_config(config, [f"run_dir={tmp_path / 'central'}", "federation.num_clients=1"])
    central = run_centralized(cfg)
    fed = json.loads((tmp_path / "fed" / "client0" / "metrics.json").read_text())
    assert "val_mcc" in central and -1 <= central["val_mcc"] <= 1
    assert fed["metrics"]["val_mcc"] == pytest.approx(central["val_mcc"], abs=1e-6)
    losses = json.loads((tmp_path / "central" / "centralized" / "metrics.json").read_text())["losses"]
    assert len(losses) == 12 and losses[-1] < losses[0]


def test_task_factory_errors_name_the_factory(tmp_path: Path) -> None:
    from flglm.config import ConfigError
    from flglm.tasks import build_task

    config = write_config(tmp_path)
    with pytest.raises(ConfigError, match="package.module:function"):
        load_config(config, ["task.factory=not a path"])
    cfg = load_config(config, ["task.factory=no_such_module_here:build"])
    with pytest.raises(ValueError, match="cannot import 'no_such_module_here'"):
        build_task(cfg, None, None)
    cfg = load_config(config, ["task.factory=json:no_such_function"])
    with pytest.raises(ValueError, match="json has no function 'no_such_function'"):
        build_task(cfg, None, None)
