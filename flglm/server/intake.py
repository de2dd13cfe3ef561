"""What a request must be before it reaches the middle stack, and what ``server.nonfinite`` does with NaN/Inf.

Every check names what is wrong and counts the refusal; with ``server.nonfinite=skip`` a float
tensor holding NaN or Inf is checked for everything else (as if finite) and then answered with
zeros, never reaching the model.
"""

from __future__ import annotations

import logging

import torch

from flglm.config import ServerConfig
from flglm.link.crossing import Crossing
from flglm.link.messages import InvalidMessageError, RequestHeader, check_forward, check_header, check_prefix
from flglm.models.prefix import kv_shape
from flglm.models.split import MiddleStack
from flglm.server.stats import ServerStats

log = logging.getLogger("flglm.server")


class Intake:
    """Checks requests against the middle stack's shapes and limits (see the module docstring)."""

    def __init__(self, middle: MiddleStack, settings: ServerConfig, stats: ServerStats, *, max_positions: int | None) -> None:
        self._middle = middle
        self._settings = settings
        self._stats = stats
        self._max_positions = max_positions

    def header(self, header: object) -> RequestHeader:
        try:
            return check_header(header)
        except InvalidMessageError:
            self._stats.rejected += 1
            raise

    def crossing(self, header: object, crossing: Crossing, *, past: int = 0) -> RequestHeader:
        """``header`` checked, and ``crossing`` fit for the middle stack (``past``: tokens a decoding session has cached)."""
        header = self.header(header)
        hidden, prefix = crossing.hidden, crossing.prefix
        try:
            if prefix is not None:
                kv_heads, head_dim = kv_shape(self._middle.hf.config)
                seen = finite(prefix) if self.skips(prefix) else prefix
                check_prefix(header, seen, layers=len(self._middle.plan.middle), kv_heads=kv_heads, head_dim=head_dim)
            check_forward(
                header,
                finite(hidden) if self.skips(hidden) else hidden,
                crossing.attention_mask,
                crossing.position_ids,
                hidden_size=self._middle.hidden_size,
                max_batch_size=self._settings.max_batch_size,
                max_positions=self._max_positions,
                mask_length=past + hidden.shape[1] if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else None,
            )
        except InvalidMessageError:
            self._stats.rejected += 1
            raise
        return header

    def rejected(self) -> None:
        """Count a refusal found past the intake (an unknown request, a gradient of the wrong shape)."""
        self._stats.rejected += 1

    def skips(self, tensor: object) -> bool:
        """``server.nonfinite=skip`` and ``tensor`` is a float tensor holding NaN or Inf."""
        return (
            self._settings.nonfinite == "skip"
            and isinstance(tensor, torch.Tensor)
            and tensor.is_floating_point()
            and not bool(torch.isfinite(tensor).all())
        )

    def skip(self, header: RequestHeader, what: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Answer a request whose ``what`` holds NaN/Inf with zeros; it never touches the model."""
        self._stats.skipped_nonfinite += 1
        log.warning("%s: %s contain NaN or Inf: skipped (server.nonfinite=skip), answered with zeros", header.describe(), what)
        return torch.zeros(shape, dtype=dtype)


def finite(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with NaN/Inf replaced by 0: checked for everything but finiteness (``server.nonfinite=skip``)."""
    return torch.nan_to_num(tensor, nan=0.0, posinf=0.0, neginf=0.0)
