"""The client's side of the link: a handle on the server and the remote middle as a module.

``RemoteMiddle`` is an ``nn.Module`` whose forward and backward are calls to the server,
wired into autograd by a ``torch.autograd.Function``: a plain ``loss.backward()`` on the
client sends the gradient of the hidden states to the server and continues into the input
block with the gradient that comes back. Lightning's automatic optimization, gradient
accumulation and precision plugins therefore work unchanged.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn
from torch.distributed.rpc import PyRRef

from flglm.federation.messages import RequestHeader, wire
from flglm.models.split import Crossing


class ServerLink:
    """Named calls to the server, through an RRef (real RPC) or a local object (tests).

    Every call carries a timeout; a failed call raises with the server's message.
    """

    def __init__(self, target: PyRRef | Any, *, client_id: int, timeout_s: float) -> None:
        self._target = target
        self._is_remote = isinstance(target, PyRRef)
        self.client_id = client_id
        self.timeout_s = timeout_s
        self._request_ids = itertools.count()

    def _call(self, name: str, *args: Any) -> Any:
        if self._is_remote:
            return getattr(self._target.rpc_sync(timeout=self.timeout_s), name)(*args)
        result = getattr(self._target, name)(*args)
        return result.wait() if isinstance(result, torch.futures.Future) else result

    def header(self) -> RequestHeader:
        autocast = ""
        if torch.is_autocast_enabled("cpu"):
            autocast = str(torch.get_autocast_dtype("cpu")).removeprefix("torch.")
        return RequestHeader(client_id=self.client_id, request_id=next(self._request_ids), autocast=autocast)

    def hello(self, config_fingerprint: str, tokenizer_fingerprint: str) -> dict[str, Any]:
        return self._call("hello", self.client_id, config_fingerprint, tokenizer_fingerprint)

    def forward(self, header: RequestHeader, crossing: Crossing) -> torch.Tensor:
        return self._call("forward", header, wire(crossing.hidden), wire(crossing.attention_mask), wire(crossing.position_ids))

    def infer(self, crossing: Crossing) -> torch.Tensor:
        return self._call(
            "infer", self.header(), wire(crossing.hidden), wire(crossing.attention_mask), wire(crossing.position_ids)
        )

    def backward(self, header: RequestHeader, grad: torch.Tensor) -> torch.Tensor:
        return self._call("backward", header, wire(grad))

    def grad_norms(self) -> torch.Tensor:
        return self._call("grad_norms", self.client_id)

    def step(self, *, client_step: int, total_steps: int, grad_scale: float = 1.0, clip_value: float | None = None) -> None:
        self._call("step", self.client_id, client_step, total_steps, grad_scale, clip_value)

    def aggregate(self, round_index: int, vector: torch.Tensor, weight: float) -> torch.Tensor:
        return self._call("aggregate", self.client_id, round_index, wire(vector), float(weight))

    def leave(self, metrics: dict[str, float]) -> None:
        self._call("leave", self.client_id, metrics)


class _MiddleCall(torch.autograd.Function):
    """Forward: send hidden states, receive the middle's output. Backward: send its gradient,
    receive the gradient of the hidden states. The server keeps the graph in between."""

    @staticmethod
    def forward(ctx, hidden, anchor, link, mask, pos):  # type: ignore[override]
        header = link.header()
        ctx.link, ctx.header = link, header
        return link.forward(header, Crossing(hidden, mask, pos))

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grad_input = ctx.link.backward(ctx.header, grad_output.contiguous())
        return grad_input, None, None, None, None


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
        training = torch.is_grad_enabled() and (crossing.hidden.requires_grad or self.server_trainable)
        if not training:
            return self.link.infer(crossing)
        return _MiddleCall.apply(crossing.hidden, self._anchor, self.link, crossing.attention_mask, crossing.position_ids)
