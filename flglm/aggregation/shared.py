"""What FedAvg averages: the client blocks' shared parameters, in the order of the averaged vector.

One definition, so the FedAvg callback that uploads the vector and the privacy evaluation that
attacks it cannot disagree on its order or on what ``privacy.private_blocks`` keeps out.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import torch


def shared_parameters(model: torch.nn.Module, exclude: Collection[str] = ()) -> list[tuple[str, torch.nn.Parameter]]:
    """What FedAvg averages, in the order of its vector: the trainable parameters not in
    ``exclude`` (matched as :func:`excluded_names` does), sorted by name."""
    named = sorted(model.named_parameters(), key=lambda item: item[0])
    excluded = excluded_names([name for name, _ in named], exclude)
    return [(name, p) for name, p in named if p.requires_grad and name not in excluded]


def excluded_names(names: Iterable[str], exclude: Collection[str]) -> set[str]:
    """The ``names`` that ``exclude`` picks: equal, or ending in ``"." + excluded name``.

    Raises:
        ValueError: an excluded name matches no name, or more than one.
    """
    if not exclude:
        return set()
    matches: dict[str, list[str]] = {e: [] for e in exclude}
    for name in names:
        for e in exclude:
            if name == e or name.endswith("." + e):
                matches[e].append(name)
    missing = sorted(e for e, found in matches.items() if not found)
    if missing:
        raise ValueError(f"FedAvg exclude names no parameter of the model: {missing[:5]}")
    ambiguous = {e: found for e, found in matches.items() if len(found) > 1}
    if ambiguous:
        raise ValueError(f"FedAvg exclude names match several parameters: {ambiguous}")
    return {found[0] for found in matches.values()}
