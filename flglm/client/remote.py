"""The client's side of the autograd boundary: the remote middle as a module.

``RemoteMiddle`` is an ``nn.Module`` whose forward and backward are calls to the server,
wired into autograd by a ``torch.autograd.Function``: a plain ``loss.backward()`` on the
client sends the gradient of the hidden states to the server and continues into the input
block with the gradient that comes back. Lightning's automatic optimization, gradient
accumulation and precision plugins therefore work unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flglm.client.server_link import ServerLink
from flglm.link.crossing import Crossing
from flglm.link.messages import InvalidMessageError


class _MiddleCall(torch.autograd.Function):
    """Forward: send hidden states, receive the middle's output. Backward: send its gradient,
    receive the gradient of the hidden states. The server keeps the graph in between."""

    @staticmethod
    def forward(ctx, hidden, anchor, prefix, link, mask, pos):  # type: ignore[override]
        header = link.header()
        ctx.link, ctx.header, ctx.has_prefix = link, header, prefix is not None
        return link.forward(header, Crossing(hidden, mask, pos, prefix))

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grad_input, grad_prefix = ctx.link.backward(ctx.header, grad_output.contiguous())
        if ctx.has_prefix and grad_prefix is None:
            raise InvalidMessageError("the server sent no gradient for the prefixes it was given")
        return grad_input, None, grad_prefix if ctx.has_prefix else None, None, None, None


class RemoteMiddle(nn.Module):
    """The server's middle stack as seen from the client."""

    def __init__(self, link: ServerLink, *, server_info: dict[str, Any]) -> None:
        super().__init__()
        self.link = link
        self.server_trainable = bool(server_info["trainable"])
        self.server_parameter_names: list[str] = list(server_info["parameter_names"])
        # Autograd calls _MiddleCall.backward only if one of its inputs requires grad; when the
        # client's input block is frozen but the server trains, this anchor makes it so.
        self._anchor = torch.zeros((), requires_grad=True)

    def forward(self, crossing: Crossing) -> torch.Tensor:
        prefix_trains = crossing.prefix is not None and crossing.prefix.requires_grad
        training = torch.is_grad_enabled() and (crossing.hidden.requires_grad or prefix_trains or self.server_trainable)
        if not training:
            return self.link.infer(crossing)
        return _MiddleCall.apply(crossing.hidden, self._anchor, crossing.prefix, self.link, crossing.attention_mask, crossing.position_ids)
