"""The value one crossing carries from the client's input block to the server's middle stack.

Both sides build and read it; the client packs it, the endpoint decodes a message into it, and
it travels down the server's compute as one value instead of four loose tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Crossing:
    """What crosses the link with the hidden states: the padding mask, the position ids and,
    with P-tuning v2, the key/value prefixes of the server's blocks."""

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prefix: torch.Tensor | None = None
