"""``server.parallelism=sequential``: a client's whole training step has the middle stack to itself."""

from __future__ import annotations

import torch

from flglm.link.crossing import Crossing
from flglm.link.messages import RequestHeader
from flglm.server.middle import Grads, MiddleCompute
from flglm.server.turns import TurnTaking


class SequentialServing:
    """Other clients wait for their turn; evaluation and decoding need none (they go straight to the core)."""

    def __init__(self, compute: MiddleCompute, *, turn_timeout_s: float) -> None:
        self._compute = compute
        self._turns = TurnTaking(timeout_s=turn_timeout_s, on_stale=self._discard)

    def forward(self, header: RequestHeader, crossing: Crossing) -> torch.Tensor:
        self._turns.acquire(header.client_id)
        return self._compute.run(self._compute.forward, header, crossing)

    def backward(self, header: RequestHeader, grad: torch.Tensor) -> Grads:
        return self._compute.run(self._compute.backward, header, grad)

    def step(self, client_id: int, client_step: int, total_steps: int, grad_scale: float, clip_value: float | None) -> None:
        self._compute.run(self._compute.step, client_step, total_steps, grad_scale, clip_value)
        self._turns.release(client_id)

    def join(self, client_id: int) -> None:
        pass

    def leave(self, client_id: int) -> None:
        if self._turns.release(client_id):
            self._compute.discard_grads()

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, float]:
        return {}

    def _discard(self, stale: int | None) -> None:
        """A turn timed out: its holder's pending forwards and half-done gradients go."""
        with self._compute.lock:
            self._compute.pending.drop_client(stale)
        self._compute.discard_grads()
