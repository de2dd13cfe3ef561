"""What an attacker gets to see: a curious server's view, and a peer's capture of the wire.

* :class:`CuriousEndpoint` is the real server endpoint (same decoding, same checks, same
  answers) that also keeps a copy of every message it handles and of its answer, after
  decryption: exactly what an honest-but-curious server operator can log.
* :class:`Wiretap` wraps a client's transport and keeps a copy of every call as it goes on the
  wire: what a peer (another client, anyone on the network) captures. With encryption on
  that is ciphertext.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.futures import Future

from flglm.link.transport import Transport
from flglm.link.wire_precision import unpack
from flglm.server.endpoint import Reply, ServerEndpoint, _as_future


def _copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


@dataclass
class Seen:
    """One message as the server handled it, and its answer."""

    client_id: int
    kind: str
    round_index: int
    step: int
    tensors: list[torch.Tensor]
    reply: list[torch.Tensor] | None = None


@dataclass
class ForwardView:
    """One training step of one client as the server saw it."""

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    output: torch.Tensor
    """What the server answered (its middle stack's output)."""
    gradient: torch.Tensor | None = None
    """The gradient the client returned for ``output`` (None if no backward came)."""


class CuriousEndpoint(ServerEndpoint):
    """The server's endpoint, keeping a copy of everything it is handed and answers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Seen] = []

    def _dispatch(self, client_id: int, kind: str, round_index: int, step: int, tensors: list[torch.Tensor]) -> Reply:
        entry = Seen(client_id, kind, round_index, step, _copies(tensors))
        self.seen.append(entry)

        def keep(done: Future) -> list[torch.Tensor]:
            value = done.wait()
            entry.reply = _copies(value)
            return value

        return _as_future(super()._dispatch(client_id, kind, round_index, step, tensors)).then(keep)

    def of(self, client_id: int, kind: str) -> list[Seen]:
        return [s for s in self.seen if s.client_id == client_id and s.kind == kind]

    def training_views(self, client_id: int) -> list[ForwardView]:
        """Each forward of ``client_id`` with the server's answer and the gradient that came back for it."""
        wire_dtype = self.codec.wire_dtype  # what the server decodes from a narrower wire is what it sees
        backwards = self.of(client_id, "backward") + self.of(client_id, "backward_step")  # the latter: step control last
        gradients = {s.step: unpack(s.tensors, wire_dtype, "client", "gradient")[0] for s in backwards}
        views = []
        for s in self.of(client_id, "forward"):
            assert s.reply is not None, "a forward without an answer"
            hidden, (mask, pos, *_) = unpack(s.tensors, wire_dtype, "client", "hidden states")
            output, _ = unpack(s.reply, wire_dtype, "server", "output")
            views.append(ForwardView(hidden, mask, pos, output, gradients.get(s.step)))
        return views


@dataclass
class Wiretap:
    """A client's transport that also keeps a copy of every call it puts on the wire."""

    inner: Transport
    captured: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    def call(self, method: str, *args: Any) -> Any:
        copied = tuple(_copies(a) if isinstance(a, list) else a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
        self.captured.append((method, copied))
        return self.inner.call(method, *args)

    def messages(self, kind: str) -> list[tuple[Any, ...]]:
        """The arguments of every captured message of ``kind`` (clear: ``exchange``, sealed: ``sealed``)."""
        out = []
        for method, args in self.captured:
            if method in ("exchange", "sealed") and args[1] == kind:
                out.append(args)
        return out
