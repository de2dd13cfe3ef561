"""The server's summary: the federation's figures from each client's final metrics, and one summary from each sub-server's."""

from __future__ import annotations

import math
from typing import Any

from flglm.link.protocol import round_trips_per_step

__all__ = ["MAX_COUNTS", "SUMMED_COUNTS", "federation_metrics", "integer_counts", "merge_server_summaries"]

SUMMED_COUNTS: tuple[str, ...] = ("steps", "samples", "resent_messages")
"""Counts whose federation figure is the clients' total (an integer)."""
MAX_COUNTS: tuple[str, ...] = ("fedavg_rounds",)
"""Counts every client shares (a FedAvg round is one for all): the federation's is the maximum,
what the federation reached (a late joiner reports fewer), an integer."""


def federation_metrics(clients: dict[str, dict[str, float]]) -> dict[str, float]:
    """Sample-weighted mean of each metric over the clients that reported it; counts are summed
    or, for FedAvg rounds, the maximum (integers), and ``val_ppl`` is exp of the mean ``val_loss``
    (a mean of perplexities is no perplexity)."""
    out: dict[str, float] = {}
    keys = sorted({k for metrics in clients.values() for k in metrics})
    for key in keys:
        rows = [(m[key], m.get("samples", 1.0)) for m in clients.values() if key in m]
        if key in SUMMED_COUNTS:
            out[key] = round(sum(v for v, _ in rows))
            continue
        if key in MAX_COUNTS:
            out[key] = round(max(v for v, _ in rows))
            continue
        total = sum(w for _, w in rows) or float(len(rows))
        out[key] = float(sum(v * (w or 1.0) for v, w in rows) / total)
    if "val_ppl" in out and "val_loss" in out:
        out["val_ppl"] = math.exp(out["val_loss"])
    return out


def integer_counts(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` with its counts as integers (the link carries every metric as a float)."""
    return {k: round(v) if k in SUMMED_COUNTS + MAX_COUNTS else v for k, v in metrics.items()}


def merge_server_summaries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary from each sub-server's: counts added up, clients merged, each sub-server kept.

    The middle stack's hash shows the replicas ended identical after the final synchronisation."""
    if len(parts) == 1:
        return dict(parts[0])

    def add(dicts: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for d in dicts:
            for key, value in d.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    out.setdefault(key, value)
                elif key == "elapsed_s":
                    out[key] = max(out.get(key, 0.0), value)
                else:
                    out[key] = out.get(key, 0) + value
        return out

    clients: dict[str, Any] = {}
    for part in parts:
        clients.update(part["clients"])
    link = add([p["link"] for p in parts])
    if "training_messages" in link:  # a ratio: of the sums, not the sum of ratios
        link["round_trips_per_step"] = round_trips_per_step(link["training_messages"], link.get("optimizer_steps", 0))
    return {
        "server": add([p["server"] for p in parts]),
        "link": link,
        **({"edge": add([p["edge"] for p in parts])} if all("edge" in p for p in parts) else {}),
        "clients": dict(sorted(clients.items(), key=lambda item: int(item[0]))),
        "sub_servers": [
            {"server": p["server"], "link": p["link"], **({"edge": p["edge"]} if "edge" in p else {}), "clients": sorted(p["clients"], key=int)}
            for p in parts
        ],
    }
