"""Split a data set's indices among federated clients.

Pure functions of their arguments and a seed, so every process of a run (and
every re-run) computes the same split without exchanging it. Each index goes to
exactly one client; indices are sorted within a client so that a split can be
compared and logged as plain lists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "PARTITION_KINDS",
    "EmptyPartitionError",
    "check_partition",
    "partition",
    "partition_dirichlet",
    "partition_iid",
]

PARTITION_KINDS: tuple[str, ...] = ("iid", "dirichlet")


class EmptyPartitionError(ValueError):
    """A client was given no (or too few) examples, so it cannot train."""


def _check_num_clients(num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")


def _check_alpha(alpha: float) -> None:
    # Written as `not alpha > 0` so that NaN is rejected too.
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")


def partition_iid(num_examples: int, num_clients: int, *, seed: int) -> list[list[int]]:
    """Shuffle the indices and deal them into ``num_clients`` near-equal parts.

    Part sizes differ by at most one. With fewer examples than clients some
    parts are empty; callers that need data use `check_partition`.
    """
    _check_num_clients(num_clients)
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    order = np.random.default_rng(seed).permutation(num_examples)
    return [sorted(part.tolist()) for part in np.array_split(order, num_clients)]


def partition_dirichlet(
    labels: Sequence[int],
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[list[int]]:
    """Label-skewed split: each class is divided among clients by Dir(alpha) shares.

    Small ``alpha`` gives each client few classes (strong skew); large ``alpha``
    approaches an iid split. A draw in which some client gets fewer than
    ``min_size`` examples is redrawn, up to ``max_tries`` times, after which
    `EmptyPartitionError` says which settings to relax.
    """
    _check_num_clients(num_clients)
    _check_alpha(alpha)
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be at least 1, got {max_tries}")
    label_array = np.asarray(labels)
    if label_array.ndim != 1 or not (label_array.size == 0 or np.issubdtype(label_array.dtype, np.integer)):
        raise ValueError(f"labels must be a flat sequence of ints, got dtype {label_array.dtype}")
    total = int(label_array.size)
    if total < num_clients * min_size:
        raise EmptyPartitionError(f"cannot give each of {num_clients} clients {min_size} example(s): only {total} examples in all")
    rng = np.random.default_rng(seed)
    smallest = 0
    for _ in range(max_tries):
        parts = _draw_dirichlet(label_array, num_clients, alpha, rng)
        smallest = min(len(part) for part in parts)
        if smallest >= min_size:
            return [sorted(part) for part in parts]
    raise EmptyPartitionError(
        f"no Dirichlet split with alpha={alpha} gave each of {num_clients} clients "
        f"at least {min_size} example(s) in {max_tries} tries ({total} examples, "
        f"smallest client got {smallest}); raise alpha, lower min_size or use fewer clients"
    )


def _draw_dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for cls in np.unique(labels):  # np.unique is sorted: a fixed order of rng draws
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(chunk.tolist())
    return parts


def partition(
    kind: str,
    num_examples: int,
    num_clients: int,
    *,
    labels: Sequence[int] | None = None,
    alpha: float = 0.5,
    seed: int,
    min_size: int = 1,
) -> list[list[int]]:
    """Dispatch to the partitioner named by ``kind`` (``"iid"`` or ``"dirichlet"``).

    ``labels`` is needed (and must have ``num_examples`` entries) for
    ``"dirichlet"``; ``alpha`` and ``min_size`` only apply there.
    """
    _check_num_clients(num_clients)
    if kind == "iid":
        return partition_iid(num_examples, num_clients, seed=seed)
    if kind == "dirichlet":
        _check_alpha(alpha)
        if labels is None:
            raise ValueError("partition kind 'dirichlet' needs labels, got labels=None")
        if len(labels) != num_examples:
            raise ValueError(f"got {len(labels)} labels for num_examples={num_examples}; they must match")
        return partition_dirichlet(labels, num_clients, alpha=alpha, seed=seed, min_size=min_size)
    raise ValueError(f"unknown partition kind {kind!r}; expected one of {list(PARTITION_KINDS)}")


def check_partition(parts: Sequence[Sequence[int]], client_index: int, description: str = "") -> Sequence[int]:
    """Return client ``client_index``'s indices, or fail if it has none.

    ``client_index`` is 0-based into ``parts``. ``description`` (for example
    ``"partition=dirichlet, alpha=0.1"``) is quoted in the error so that the
    person reading it knows which settings to change.
    """
    num_clients = len(parts)
    if not 0 <= client_index < num_clients:
        raise IndexError(f"client index {client_index} is out of range for {num_clients} clients")
    indices = parts[client_index]
    if len(indices) == 0:
        total = sum(len(part) for part in parts)
        settings = f"{description}, " if description else ""
        raise EmptyPartitionError(
            f"client {client_index} of {num_clients} has no examples "
            f"({settings}{total} examples in all); use more data, fewer clients "
            f"or a less skewed partition (larger alpha)"
        )
    return indices
