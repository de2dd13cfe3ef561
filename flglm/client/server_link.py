"""The client's calls to the server: one method per message kind, resent after a loss, sealed when encrypted."""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.distributed.rpc import PyRRef

from flglm.crypto.errors import ReplayError, SessionError, TamperError
from flglm.crypto.sessions import ClientSession
from flglm.devices import active_autocast
from flglm.link.crossing import Crossing
from flglm.link.messages import InvalidMessageError, RequestHeader, nbytes, wire
from flglm.link.protocol import (
    REPLY_KIND,
    WirePlan,
    autocast_code,
    begin_tensor,
    decode_control,
    json_tensor,
    json_value,
    parse_plan,
    parse_result,
    step_control,
)
from flglm.link.transport import RetryPolicy, Transport, TransportError, as_transport
from flglm.link.wire_precision import WireCodec

log = logging.getLogger("flglm.client")
T = TypeVar("T")


class ServerLink:
    """The client's calls to the server, through an RRef (real RPC) or a local endpoint (tests).

    Each call is one message of the protocol (:mod:`flglm.link.protocol`): in the clear,
    or sealed under this client's session when a :class:`ClientSession` is given. Every call
    carries a timeout (``timeout_s``) and is resent after a loss (``retry``); a message the
    server refuses raises with the server's message. Hidden states and gradients cross in
    ``wire_dtype`` (``link.wire_dtype``, the server's own: it is in the config fingerprint),
    encoded here after the privacy defences (:class:`~flglm.link.wire_precision.WireCodec`).
    """

    def __init__(
        self,
        target: PyRRef | Transport | Any,
        *,
        client_id: int,
        timeout_s: float,
        session: ClientSession | None = None,
        retry: RetryPolicy | None = None,
        wire_dtype: str = "float32",
        fold_steps: bool = True,
    ) -> None:
        self.transport = as_transport(target, timeout_s=timeout_s)
        self.client_id = client_id
        self.timeout_s = timeout_s
        self.session = session
        self.retry = retry or RetryPolicy()
        self.codec = WireCodec(wire_dtype)
        self.retries = 0
        """Messages resent after a transport failure (the server answers a resent one from its record)."""
        self.incarnation = secrets.randbits(61) | 1 << 61  # 19 digits: a join's size does not vary
        """Tells the server a restarted client (a new process) from a resent join of this one."""
        self._request_ids = itertools.count()
        self._decode_sessions = itertools.count()
        self.messages = 0
        self.payload_bytes = 0
        """Raw bytes of the tensors this client sent and received."""
        self.wire_bytes = 0
        """Bytes that crossed the link for them (ciphertext, headers and tags when sealed)."""
        self.fold_steps = fold_steps
        """Send an optimizer step armed by :meth:`arm_step` with the backward before it (``backward_step``)."""
        self._armed: tuple[int, float | None, torch.Tensor] | None = None
        self._folded: tuple[int, float | None] | None = None
        self._open_forwards = 0

    @property
    def encrypted(self) -> bool:
        return self.session is not None

    def _rpc(self, name: str, *args: Any) -> Any:
        result = self.transport.call(name, *args)
        if isinstance(result, BaseException):
            raise result
        return result

    def exchange(self, kind: str, tensors: list[torch.Tensor], *, round_index: int = 0, step: int = 0) -> list[torch.Tensor]:
        """Send one message and return the tensors of the answer.

        A message lost on the way, or whose answer was lost, is resent after a backoff (up to
        ``retry.max_retries`` times) with the same kind, round and step: the server answers a
        message it has already handled from its record, so nothing is applied twice. With
        encryption a loss desynchronises the session's counters, so a resend starts with a new
        handshake. The server's refusal of a message is not a loss and is raised at once.
        """
        return self._with_retries(kind, lambda: self._exchange_once(kind, tensors, round_index=round_index, step=step))

    def _with_retries(self, what: str, call: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return call()
            except (TransportError, ReplayError, SessionError, TamperError) as exc:
                if attempt >= self.retry.max_retries:
                    raise TransportError(f"client {self.client_id}: {what} failed after {attempt + 1} attempts: {exc}") from exc
                delay = self.retry.delay(attempt)
                log.warning("client %d: %s failed (%s); resending in %.2fs", self.client_id, what, exc, delay)
                attempt += 1
                self.retries += 1
                if self.session is not None:
                    self.session.close()  # both ends start over with fresh keys
                time.sleep(delay)

    def _exchange_once(self, kind: str, tensors: list[torch.Tensor], *, round_index: int, step: int) -> list[torch.Tensor]:
        tensors = [wire(t) for t in tensors]
        self.messages += 1
        if self.session is None:
            reply = self._rpc("exchange", self.client_id, kind, round_index, step, tensors)
            crossed = nbytes(*tensors, *reply)
            self.payload_bytes += crossed
            self.wire_bytes += crossed
            return reply
        if not self.session.connected:  # first call, or after the session was torn down
            self._handshake_once()
        sealed = self.session.seal(kind, tensors, round=round_index, step=step)
        answer = self._rpc("sealed", self.client_id, kind, sealed)
        _, reply = self.session.open(answer, expect_kind=REPLY_KIND[kind])
        self.payload_bytes += nbytes(*tensors, *reply)
        self.wire_bytes += sealed.numel() + answer.numel()
        return reply

    def handshake(self) -> None:
        """Run a (new) key exchange with the server: at start, and to re-key (fresh ephemeral keys)."""
        if self.session is None:
            raise RuntimeError("this link has no ClientSession: encryption is off")
        self._with_retries("handshake", self._handshake_once)

    def _handshake_once(self) -> None:
        assert self.session is not None
        self.session.finish(self._rpc("handshake", self.client_id, self.session.hello()))

    def header(self) -> RequestHeader:
        return RequestHeader(client_id=self.client_id, request_id=next(self._request_ids), autocast=active_autocast())

    def hello(self, config_fingerprint: str, tokenizer_fingerprint: str, *, checkpoints: list[int] | None = None) -> dict[str, Any]:
        """Join the federation; ``checkpoints`` (resume) are the rounds this client has checkpoints of."""
        facts = {"config": config_fingerprint, "tokenizer": tokenizer_fingerprint, "incarnation": self.incarnation}
        if checkpoints is not None:
            facts["checkpoints"] = list(checkpoints)
        (info,) = self.exchange("join", [json_tensor(facts)])
        return json_value(info, "the server's welcome")

    def _crossing(self, crossing: Crossing, control: torch.Tensor) -> list[torch.Tensor]:
        """The message of a crossing: its hidden states in the wire dtype, the mask, positions and
        ``control`` exact, and the P-tuning prefixes (exact: the client's own parameters)."""
        tensors = [*self.codec.pack(crossing.hidden.detach()), crossing.attention_mask, crossing.position_ids, control]
        return tensors if crossing.prefix is None else [*tensors, crossing.prefix]

    def _output(self, reply: list[torch.Tensor]) -> torch.Tensor:
        out, rest = self.codec.unpack(reply, "the server", "its output")
        if rest:
            raise InvalidMessageError(f"an output answer carries the hidden states only, got {len(rest)} more tensors")
        return out

    def forward(self, header: RequestHeader, crossing: Crossing) -> torch.Tensor:
        tensors = self._crossing(crossing, autocast_code(header.autocast))
        out = self._output(self.exchange("forward", tensors, step=header.request_id))
        self._open_forwards += 1
        return out

    def infer(self, crossing: Crossing) -> torch.Tensor:
        header = self.header()
        tensors = self._crossing(crossing, autocast_code(header.autocast))
        return self._output(self.exchange("infer", tensors, step=header.request_id))

    def open_decoding(self) -> int:
        """A new decoding session number (the server creates its cache on the first ``decode``)."""
        return next(self._decode_sessions)

    def decode(self, session: int, past: int, crossing: Crossing) -> torch.Tensor:
        """The middle stack's output for new tokens of a decoding session that has ``past`` cached tokens."""
        header = self.header()
        tensors = self._crossing(crossing, decode_control(header.autocast, past))
        return self._output(self.exchange("decode", tensors, round_index=session, step=header.request_id))

    def end_decoding(self, session: int) -> None:
        self.exchange("decode_end", [], round_index=session)

    def backward(self, header: RequestHeader, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gradient of the hidden states sent, and of the prefixes sent with them (P-tuning v2).

        The backward of the last forward still waiting for one carries the optimizer step armed
        by :meth:`arm_step`: after it the server has every gradient of that step."""
        tensors = self.codec.pack(grad.detach())
        self._open_forwards = max(0, self._open_forwards - 1)
        if self._armed is not None and self._open_forwards == 0:
            (client_step, clip_value, control), self._armed = self._armed, None
            reply = self.exchange("backward_step", [*tensors, control], step=header.request_id)
            self._folded = (client_step, clip_value)
        else:
            reply = self.exchange("backward", tensors, step=header.request_id)
        grad_in, rest = self.codec.unpack(reply, "the server", "its gradient of the hidden states")
        if len(rest) > 1:
            raise InvalidMessageError(f"a backward answer carries the gradient and at most the prefixes' one, got {len(rest)} more tensors")
        return grad_in, (rest[0] if rest else None)

    def grad_norms(self) -> torch.Tensor:
        (norms,) = self.exchange("grad_norms", [])
        return norms

    def arm_step(self, *, client_step: int, total_steps: int, clip_value: float | None = None) -> None:
        """The coming backward ends optimizer step ``client_step`` (no clipping by global norm, no
        gradient accumulation): fold the server's step into it (a no-op with ``fold_steps`` off)."""
        if self.fold_steps:
            self._armed = (client_step, clip_value, step_control(client_step, total_steps, 1.0, clip_value))

    def step(self, *, client_step: int, total_steps: int, grad_scale: float = 1.0, clip_value: float | None = None) -> None:
        """The server's optimizer step, unless it went with the step's last backward."""
        folded, self._folded, self._armed = self._folded, None, None
        self._open_forwards = 0  # a forward whose loss took no part in the step waits for no backward
        if folded is not None and folded[0] == client_step:
            if grad_scale != 1.0 or folded[1] != clip_value:
                raise RuntimeError(
                    f"client {self.client_id}: optimizer step {client_step} went with its backward "
                    f"(clip {folded[1]}), but is now asked with grad scale {grad_scale}, clip {clip_value}"
                )
            return
        self.exchange("step", [step_control(client_step, total_steps, grad_scale, clip_value)], step=client_step)

    def aggregation_begin(self, round_index: int, fits_narrow: bool = False) -> WirePlan:
        """Secure aggregation: wait until every active client has begun the round; its plan."""
        (plan,) = self.exchange("agg_begin", [begin_tensor(fits_narrow)], round_index=round_index)
        return parse_plan(plan)

    def aggregation_upload(
        self, round_index: int, attempt: int, vector: torch.Tensor, weight: float
    ) -> tuple[torch.Tensor | None, WirePlan]:
        """Upload (masked or plain) client blocks; the average, or None and the plan of the redone round."""
        status, average = self.exchange(
            "agg_upload", [vector, torch.tensor([float(weight)], dtype=torch.float64)], round_index=round_index, step=attempt
        )
        return parse_result(status, average)

    def aggregate(self, round_index: int, vector: torch.Tensor, weight: float) -> torch.Tensor:
        """Plain FedAvg: the weighted average of every active client's ``vector``."""
        average, _ = self.aggregation_upload(round_index, 0, vector, weight)
        assert average is not None
        return average

    def leave(self, metrics: dict[str, float]) -> None:
        self.exchange("leave", [json_tensor({k: float(v) for k, v in metrics.items()})])
        if self.session is not None:
            self.session.close()
