"""How the server serves many clients: one module per ``server.parallelism`` mode, behind :class:`Serving`.

``sequential`` (one client's step at a time; also what each hierarchical sub-server runs) and
``client_batching`` (clients' requests gathered into one batch) both take training requests
through the same five calls; :mod:`~flglm.server.serving.parallelism` picks the mode and builds
it. Evaluation and decoding need no serving mode: they change no weights and go straight to
the compute core.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch.futures import Future

from flglm.link.crossing import Crossing
from flglm.link.messages import RequestHeader
from flglm.server.middle import Grads

Answer = torch.Tensor | Future
"""A result now, or (client batching) a future resolved when the group has run."""


class Serving(Protocol):
    """Training requests of the clients, in the order a mode serves them."""

    def forward(self, header: RequestHeader, crossing: Crossing) -> Answer: ...

    def backward(self, header: RequestHeader, grad: torch.Tensor) -> Grads | Future: ...

    def step(self, client_id: int, client_step: int, total_steps: int, grad_scale: float, clip_value: float | None) -> Future | None: ...

    def join(self, client_id: int) -> None:
        """A client (re)joined."""
        ...

    def leave(self, client_id: int) -> None:
        """A client left, was dropped or restarted: what the mode holds for it is freed."""
        ...

    def close(self) -> None: ...

    def stats(self) -> dict[str, float]:
        """The mode's own figures for ``summary.json`` (empty if it has none)."""
        ...
