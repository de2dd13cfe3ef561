"""``flglm compare``: finished runs side by side — their final metrics in one table, the ratio of
each to the reference run, and their training-loss curves in one plot.

A run directory holds a federation (``summary.json``, written last by its server, and each
client's ``client{i}/metrics.json``), a centralized run (``centralized/metrics.json``, as
``flglm centralized`` and ``make demo`` write it; or ``metrics.json`` itself when the
``centralized`` folder is named), or both (``make demo``'s). The reference is the first
centralized run named, else the first run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flglm.jobs.summaries import MAX_COUNTS, SUMMED_COUNTS
from flglm.run_layout import summary_path

__all__ = ["CompareError", "Comparison", "RunResult", "compare_runs", "load_runs", "write_comparison"]

HEADLINE_METRICS: tuple[str, ...] = ("val_acc", "val_rougeL", "val_rouge1", "val_bleu", "val_ppl", "val_loss")
"""The metric a ratio is reported for: the first of these every run has (accuracy for
classification, ROUGE-L for generation, perplexity for language modelling)."""
LOWER_IS_BETTER: frozenset[str] = frozenset({"val_ppl", "val_loss"})
TABLE_EXTRAS: tuple[str, ...] = ("train_time_s", "fedavg_rounds")
"""Columns shown after the ``val_*`` metrics, where a run has them."""
SMOOTHING = 10
"""Training losses are plotted as a moving average over this many steps (one step is noisy)."""


class CompareError(ValueError):
    """A named directory holds no finished run, or one of its files cannot be read."""


@dataclass(frozen=True)
class RunResult:
    """One row of the table: a federation's figures (sample-weighted over its clients) or a centralized run's."""

    label: str
    kind: Literal["federated", "centralized"]
    run_dir: Path
    metrics: dict[str, float]
    curves: dict[str, list[float]] = field(default_factory=dict)
    """Training loss per step: one curve per client of a federation, one for a centralized run."""
    epochs: int | None = None
    """``trainer.max_epochs`` of the run (from its ``config.yaml``), for the plot's x axis; None if unknown."""


@dataclass(frozen=True)
class Comparison:
    runs: list[RunResult]
    reference: RunResult
    metric: str | None
    """The headline metric every run has (None: the runs share none of ``HEADLINE_METRICS``)."""
    ratios: dict[str, float]
    """Each other run's ``metric`` over the reference's, by label."""

    def columns(self) -> list[str]:
        names = sorted({k for run in self.runs for k in run.metrics if k.startswith("val_")})
        if self.metric in names:
            names.remove(self.metric)
            names.insert(0, self.metric)
        return names + [k for k in TABLE_EXTRAS if any(k in run.metrics for run in self.runs)]

    def table(self) -> str:
        columns = self.columns()
        width = max(12, *(len(run.label) + 2 for run in self.runs))
        lines = [" " * width + "".join(f"{c:>14}" for c in columns)]
        for run in self.runs:
            cells = [_cell(c, run.metrics.get(c)) for c in columns]
            lines.append(f"{run.label:<{width}}" + "".join(f"{c:>14}" for c in cells))
        return "\n".join(lines)

    def ratio_lines(self) -> list[str]:
        if self.metric is None:
            return [f"no metric shared by every run among {', '.join(HEADLINE_METRICS)}: no ratio"]
        better = "lower" if self.metric in LOWER_IS_BETTER else "higher"
        return [f"{label} / {self.reference.label} {self.metric}: {ratio:.3f} ({better} is better)" for label, ratio in self.ratios.items()]

    def as_json(self) -> dict[str, Any]:
        return {
            "runs": [{"label": r.label, "kind": r.kind, "run_dir": str(r.run_dir), "metrics": r.metrics} for r in self.runs],
            "reference": self.reference.label,
            "metric": self.metric,
            "ratios": self.ratios,
        }


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return str(round(value)) if key in MAX_COUNTS + SUMMED_COUNTS else f"{value:.4f}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CompareError(f"{path}: cannot be read as JSON ({err})") from None
    if not isinstance(data, dict):
        raise CompareError(f"{path}: a JSON {type(data).__name__}, not the object a run writes")
    return data


def _metrics_file(path: Path) -> tuple[dict[str, float], list[float]]:
    """A ``metrics.json`` (client or centralized): final metrics and the loss history."""
    data = _read_json(path)
    if not isinstance(data.get("metrics"), dict):
        raise CompareError(f"{path}: has no 'metrics' object (keys: {', '.join(data) or 'none'})")
    return _numbers(data["metrics"]), [float(v) for v in data.get("losses", [])]


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _epochs(run_dir: Path) -> int | None:
    """``trainer.max_epochs`` from the run's saved config (None when absent or unbounded)."""
    for candidate in (run_dir / "config.yaml", run_dir.parent / "config.yaml"):
        if candidate.is_file():
            import yaml
            from omegaconf import OmegaConf
            from omegaconf.errors import OmegaConfBaseException

            try:
                epochs = OmegaConf.select(OmegaConf.load(candidate), "trainer.max_epochs")
            except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException):  # unreadable: plot by fraction of training
                return None
            return int(epochs) if isinstance(epochs, int) and epochs > 0 else None
    return None


def load_runs(run_dir: str | Path, *, name: str | None = None) -> list[RunResult]:
    """The finished runs in ``run_dir``: its federation, its centralized run, or both, federation first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CompareError(f"{run_dir}: no such directory")
    prefix = f"{name} " if name else ""
    found: list[RunResult] = []
    summary = summary_path(run_dir)
    if summary.is_file():
        data = _read_json(summary)
        if not isinstance(data.get("federation"), dict):
            raise CompareError(
                f"{summary}: has no 'federation' metrics (keys: {', '.join(data) or 'none'}); was it written by a finished federation?"
            )
        curves: dict[str, list[float]] = {}
        for client in sorted(data.get("clients", {}), key=int):
            client_file = run_dir / f"client{client}" / "metrics.json"
            if client_file.is_file():
                curves[f"{prefix}client {client} (federated)"] = _metrics_file(client_file)[1]
        found.append(RunResult(f"{prefix}federated".strip(), "federated", run_dir, _numbers(data["federation"]), curves, _epochs(run_dir)))
    central_dir = run_dir / "centralized" if (run_dir / "centralized" / "metrics.json").is_file() else run_dir
    central_file = central_dir / "metrics.json"
    if central_file.is_file() and not (central_dir == run_dir and summary.is_file()):
        metrics, losses = _metrics_file(central_file)
        label = f"{prefix}centralized".strip()
        found.append(RunResult(label, "centralized", central_dir, metrics, {label: losses}, _epochs(central_dir)))
    if not found:
        raise CompareError(
            f"{run_dir}: no finished run here: no summary.json (a federation writes it when it finishes) "
            "and no centralized/metrics.json or metrics.json (a centralized run's)"
        )
    return found


def _names(run_dirs: list[Path]) -> list[str | None]:
    """Labels for the runs: none for a single directory, else the shortest distinct path suffix."""
    if len(run_dirs) == 1:
        return [None]
    for depth in range(1, max(len(p.parts) for p in run_dirs)):
        names = ["/".join(p.parts[-depth:]) for p in run_dirs]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in run_dirs]  # distinct (compare_runs refuses a directory named twice)


def compare_runs(run_dirs: list[str | Path]) -> Comparison:
    """Load every run of ``run_dirs`` and the headline metric's ratio of each to the reference."""
    if not run_dirs:
        raise CompareError("name at least one run directory")
    paths = [Path(p) for p in run_dirs]
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise CompareError(f"the same run directory is named twice: {', '.join(map(str, paths))}")
    runs = [run for path, name in zip(paths, _names(resolved)) for run in load_runs(path, name=name)]
    reference = next((r for r in runs if r.kind == "centralized"), runs[0])
    metric = next((m for m in HEADLINE_METRICS if all(m in r.metrics for r in runs)), None)
    ratios: dict[str, float] = {}
    if metric is not None:
        base = reference.metrics[metric]
        for run in runs:
            if run is not reference:
                ratios[run.label] = run.metrics[metric] / base if base else math.nan
    return Comparison(runs, reference, metric, ratios)


def write_comparison(comparison: Comparison, out_dir: str | Path) -> tuple[Path, Path]:
    """``comparison.json`` and ``loss_curves.png`` in ``out_dir``; returns their paths."""
    from flglm.tensor_files import write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, plot_path = out_dir / "comparison.json", out_dir / "loss_curves.png"
    write_json(comparison.as_json(), json_path)
    _plot(comparison.runs, plot_path)
    return json_path, plot_path


def _plot(runs: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_epoch = all(run.epochs for run in runs)
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        for label, losses in run.curves.items():
            if not losses:
                continue
            span = run.epochs if by_epoch else 1.0
            x = [span * (i + 1) / len(losses) for i in range(len(losses))]
            style = {"color": "black"} if run.kind == "centralized" and len(runs) <= 2 else {}
            ax.plot(x, _smooth(losses), label=label, alpha=0.8, **style)
    ax.set_xlabel("epoch" if by_epoch else "fraction of training")
    ax.set_ylabel(f"training loss (moving average of {SMOOTHING})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _smooth(values: list[float], k: int = SMOOTHING) -> list[float]:
    out: list[float] = []
    window: list[float] = []
    for v in values:
        window = [*window[-(k - 1) :], v] if k > 1 else [v]
        out.append(sum(window) / len(window))
    return out
