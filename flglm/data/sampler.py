"""The training data order as a pure function of (seed, epoch), so a resumed run sees the same batches.

``DataLoader(shuffle=True)`` draws each epoch's order from a generator whose state a
checkpoint does not hold; Lightning resumes at the right batch index but (measured) with other
batches. Here the order of epoch ``e`` is ``randperm(n)`` seeded by ``(seed, e)``, and a
resumed epoch skips the samples already trained on.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Shuffled (or in-order) indices of ``n`` examples, reproducible per epoch and resumable mid-epoch."""

    def __init__(self, n: int, *, seed: int, shuffle: bool = True) -> None:
        if n < 1:
            raise ValueError(f"a sampler needs at least one example, got {n}")
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def resume_at(self, epoch: int, samples_done: int) -> None:
        """The next iteration is epoch ``epoch`` without its first ``samples_done`` samples."""
        self.epoch, self._skip = epoch, samples_done

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        skip, self._skip = self._skip, 0
        yield from order[skip:]
