"""The server's RPC surface: the one object clients reach, and the only way in.

Clients hold an RRef to a ``ServerEndpoint``, not to the ``MiddleServer``: every call enters
through ``exchange`` (messages in the clear, when ``crypto.enabled=false``) or ``handshake`` +
``sealed`` (encrypted), is decoded into the server's typed methods by one dispatch table, and
its answer goes back the same way. With encryption on, the clear entry refuses to serve, so
nothing reaches the model without a client's keys.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed import rpc
from torch.futures import Future

from flglm.crypto.errors import ChannelError
from flglm.crypto.sessions import ServerSessions
from flglm.link import protocol as P
from flglm.link.crossing import Crossing
from flglm.link.messages import InvalidMessageError, RequestHeader, nbytes
from flglm.link.wire_precision import WireCodec, parts_of
from flglm.server.exactly_once import ReplyRecord
from flglm.server.middle_server import MiddleServer

log = logging.getLogger("flglm.server")

Reply = list[torch.Tensor] | Future
_CLEAR_SERVER = "this server runs without encryption (crypto.enabled=false); the client has it on"


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _failed(exc: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(exc)
    return future


class ServerEndpoint:
    """Decodes each message, calls the server, encodes (and seals) the answer."""

    def __init__(self, server: MiddleServer, sessions: ServerSessions | None = None) -> None:
        self.server = server
        self.sessions = sessions
        self._handlers: dict[str, Callable[[int, int, int, list[torch.Tensor]], Reply]] = {
            "join": self._join,
            "forward": self._forward,
            "infer": self._infer,
            "decode": self._decode,
            "decode_end": self._decode_end,
            "backward": self._backward,
            "backward_step": self._backward_step,
            "grad_norms": self._grad_norms,
            "step": self._step,
            "agg_begin": self._agg_begin,
            "agg_upload": self._agg_upload,
            "leave": self._leave,
        }
        self.record = ReplyRecord()
        self.training_messages = 0
        """Messages of training steps received (``TRAINING_STEP_KINDS``, resends too: each is a round trip)."""
        self.optimizer_steps = 0
        """Clients' optimizer steps asked for (a ``step`` or a ``backward_step``)."""
        self.codec = WireCodec(server.cfg.link.wire_dtype)
        """Hidden states and gradients in ``link.wire_dtype``: decoded as they come in, encoded as they go out."""
        self.wire_bytes_in = 0
        self.wire_bytes_out = 0
        self.payload_bytes_in = 0
        self.payload_bytes_out = 0
        """Raw bytes of the tensors handled and answered (the wire's are these plus headers and tags when sealed)."""

    # ------------------------------------------------------------------ entries
    def handshake(self, client_id: int, hello: torch.Tensor) -> torch.Tensor:
        """Answer a client's hello (encrypted federations only)."""
        if self.sessions is None:
            raise ChannelError(_CLEAR_SERVER)
        return self.sessions.accept(_client_id(client_id), hello)

    @rpc.functions.async_execution
    def exchange(self, client_id: int, kind: str, round_index: int, step: int, tensors: list[torch.Tensor]) -> Future:
        """One message in the clear."""
        try:
            if self.sessions is not None:
                raise ChannelError("this server requires encryption (crypto.enabled=true); clear messages are refused")
            client_id = _client_id(client_id)
            kind = _kind(kind)
            if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in (round_index, step)):
                raise InvalidMessageError(f"client {client_id}: round and step must be integers >= 0")
            if not isinstance(tensors, list) or not all(isinstance(t, torch.Tensor) for t in tensors):
                raise InvalidMessageError(f"client {client_id}: a message carries a list of tensors")
            self.wire_bytes_in += nbytes(*tensors)
            return self._answer(client_id, kind, round_index, step, tensors).then(self._count_out)
        except Exception as exc:  # noqa: BLE001 - any failure becomes the caller's error, never a dead RPC thread
            return _failed(exc)

    @rpc.functions.async_execution
    def sealed(self, client_id: int, kind: str, message: torch.Tensor) -> Future:
        """One encrypted message; the answer is sealed under the same session."""
        try:
            if self.sessions is None:
                raise ChannelError(_CLEAR_SERVER)
            client_id = _client_id(client_id)
            kind = _kind(kind)
            if isinstance(message, torch.Tensor):
                self.wire_bytes_in += message.numel()
            header, tensors = self.sessions.open(client_id, message, expect_kind=kind)
            reply = self._answer(client_id, kind, header.round, header.step, tensors)
            sessions = self.sessions

            def seal(done: Future) -> torch.Tensor:
                sealed = sessions.seal(client_id, P.REPLY_KIND[kind], done.wait(), round=header.round, step=header.step)
                if kind == "leave":
                    sessions.close(client_id)
                self.wire_bytes_out += sealed.numel()
                return sealed

            return reply.then(seal)
        except Exception as exc:  # noqa: BLE001 - any failure becomes the caller's error, never a dead RPC thread
            return _failed(exc)

    def summary(self) -> dict[str, Any]:
        """Encryption state and bytes that crossed the link (ciphertext when sealed)."""
        out: dict[str, Any] = {
            "encrypted": self.sessions is not None,
            "wire_bytes_in": self.wire_bytes_in,
            "wire_bytes_out": self.wire_bytes_out,
            "payload_bytes_in": self.payload_bytes_in,
            "payload_bytes_out": self.payload_bytes_out,
            "duplicate_messages": self.record.stats.duplicates,
            "stale_messages": self.record.stats.stale,
            "training_messages": self.training_messages,
            "optimizer_steps": self.optimizer_steps,
            "round_trips_per_step": P.round_trips_per_step(self.training_messages, self.optimizer_steps),
        } | self.codec.summary(sent="out", received="in")
        if self.sessions is not None:
            out |= {"handshakes": self.sessions.handshakes, "rejected_messages": self.sessions.rejected}
        return out

    def _count_out(self, done: Future) -> list[torch.Tensor]:
        tensors = done.wait()
        self.wire_bytes_out += nbytes(*tensors)
        return tensors

    # ----------------------------------------------------------------- dispatch
    def _answer(self, client_id: int, kind: str, round_index: int, step: int, tensors: list[torch.Tensor]) -> Future:
        """Handle a message once; a copy of it (resent or duplicated) is answered from the record.

        The server counts the client as alive while the message is handled (a client waiting
        for its turn or for a FedAvg round is not silent)."""
        self.server.check_member(client_id, kind)
        self.training_messages += kind in P.TRAINING_STEP_KINDS
        self.optimizer_steps += kind in P.OPTIMIZER_STEP_KINDS
        server = self.server
        server.message_begins(client_id)
        try:
            answer = self.record.answer(
                client_id, (kind, round_index, step), lambda: _as_future(self._dispatch(client_id, kind, round_index, step, tensors))
            )
        except BaseException:
            server.message_ends(client_id)
            raise
        answer.add_done_callback(lambda _: server.message_ends(client_id))
        self.payload_bytes_in += nbytes(*tensors)
        return answer.then(self._count_payload_out)

    def _count_payload_out(self, done: Future) -> list[torch.Tensor]:
        tensors = done.wait()
        self.payload_bytes_out += nbytes(*tensors)
        return tensors

    def _dispatch(self, client_id: int, kind: str, round_index: int, step: int, tensors: list[torch.Tensor]) -> Reply:
        return self._handlers[kind](client_id, round_index, step, tensors)

    def _join(self, client_id: int, round_index: int, step: int, tensors: list[torch.Tensor]) -> Reply:
        (payload,) = P.expect_tensors(tensors, 1, f"client {client_id}", "join")
        facts = P.json_value(payload, f"client {client_id}: join")
        if not isinstance(facts, dict) or not isinstance(facts.get("config"), str) or not isinstance(facts.get("tokenizer"), str):
            raise InvalidMessageError(f"client {client_id}: join must carry the config and tokenizer fingerprints")
        incarnation = facts.get("incarnation", 0)
        if not isinstance(incarnation, int) or isinstance(incarnation, bool) or not 0 <= incarnation < 2**63:
            raise InvalidMessageError(f"client {client_id}: join's incarnation must be an integer in [0, 2**63)")
        checkpoints = facts.get("checkpoints", [])
        if (
            not isinstance(checkpoints, list)
            or len(checkpoints) > 4096
            or not all(isinstance(r, int) and not isinstance(r, bool) and 0 < r < 2**31 for r in checkpoints)
        ):
            raise InvalidMessageError(f"client {client_id}: join's checkpoints must be a list of at most 4096 round numbers >= 1")
        info, fresh = self.server.hello(client_id, facts["config"], facts["tokenizer"], incarnation=incarnation, checkpoints=checkpoints)
        if fresh:
            self.record.forget(client_id)  # a new process: its message keys start over
        return [P.json_tensor(info)]

    def _crossing(self, client_id: int, kind: str, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """A crossing's [hidden, mask, positions, ctrl] (the hidden states decoded from the wire) and its prefixes."""
        who = f"client {client_id}"
        head, prefix = P.crossing_tensors(tensors, who, kind, hidden_parts=parts_of(self.codec.wire_dtype))
        hidden, rest = self.codec.unpack(head, who, f"a {kind!r} message's hidden states")
        return [hidden, *rest], prefix

    def _forward(self, client_id: int, round_index: int, step: int, tensors: list[torch.Tensor]) -> Reply:
        (hidden, mask, pos, ctrl), prefix = self._crossing(client_id, "forward", tensors)
        header = RequestHeader(client_id, step, P.autocast_name(ctrl, f"client {client_id}"))
        return _then(self.server.forward(header, Crossing(hidden, mask, pos, prefix)), self.codec.pack)

    def _infer(self, client_id: int, round_index: int, step: int, tensors: list[torch.Tensor]) -> Reply:
        (hidden, mask, pos, ctrl), prefix = self._crossing(client_id, "infer", tensors)
        header = RequestHeader(client_id, step, P.autocast_name(ctrl, f"client {client_id}"))
        return self.codec.pack(self.server.infer(header, Crossing(hidden, mask, pos, prefix)))

    def _decode(self, client_id: int, round_index: int, step: int, tensors: list[torch.Tensor]) -> Reply:
        (hidden, mask, pos, ctrl), prefix = self._crossing(client_id, "decode", tensors)
        autocast, past = P.parse_decode_control(ctrl, f"client {client_id}")
        header = RequestHeader(client_id, step, autocast)
        return self.codec.pack(self.server.decode(header, round_index, past, Crossing(hidden, mask, pos, prefix)))

    def _decode_end(self, client_id: int, round_index: int, step: int, tensors: list[torch.Tensor]) -> Reply:
        P.expect_tensors(tensors, 0, f"client {client_id}", "decode_end")
        self.server.end_decoding(client_id, round_index)
        return []

    def _backward(self, client_id: int, round_index: int, step: int, tensors: list[torch.Tensor]) -> Reply:
        parts = P.expect_tensors(tensors, parts_of(self.codec.wire_dtype), f"client {client_id}", "backward")
        grad, _ = self.codec.unpack(parts, f"client {client_id}", "a backward message's gradient")
        return _then(self.server.backward(RequestHeader(client_id, step), grad), self._grads_reply)

    def _backward_step(self, client_id: int, round_index: int, step: int, tensors: list[torch.Tensor]) -> Reply:
        """A backward with the client's optimizer step folded in: backpropagate, step, then answer
        (the step control is checked before anything changes)."""
        who = f"client {client_id}"
        parts = P.expect_tensors(tensors, parts_of(self.codec.wire_dtype) + 1, who, "backward_step")
        client_step, total, scale, clip = P.parse_step_control(parts[-1], who)
        grad, _ = self.codec.unpack(parts[:-1], who, "a backward_step message's gradient")
        grads = self.server.backward(RequestHeader(client_id, step), grad)

        def step_then_answer(done: Any) -> Reply:
            return _then(self.server.step(client_id, client_step, total, scale, clip), lambda _: self._grads_reply(done))

        return _chain(grads, step_then_answer)

    def _grads_reply(self, grads: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        """d loss / d inputs in the wire dtype; P-tuning's d loss / d prefixes exact, like the prefixes."""
        if isinstance(grads, tuple):
            grad_in, grad_prefix = grads
            return [*self.codec.pack(grad_in), grad_prefix]
        return self.codec.pack(grads)

    def _grad_norms(self, client_id: int, round_index: int, step: int, tensors: list[torch.Tensor]) -> Reply:
        P.expect_tensors(tensors, 0, f"client {client_id}", "grad_norms")
        return [self.server.grad_norms(client_id)]

    def _step(self, client_id: int, round_index: int, step: int, tensors: list[torch.Tensor]) -> Reply:
        (ctrl,) = P.expect_tensors(tensors, 1, f"client {client_id}", "step")
        client_step, total, scale, clip = P.parse_step_control(ctrl, f"client {client_id}")
        return _then(self.server.step(client_id, client_step, total, scale, clip), lambda _: [])

    def _agg_begin(self, client_id: int, round_index: int, step: int, tensors: list[torch.Tensor]) -> Reply:
        (fits,) = P.expect_tensors(tensors, 1, f"client {client_id}", "agg_begin")
        return self.server.aggregation_begin(client_id, round_index, P.parse_begin(fits, f"client {client_id}"))

    def _agg_upload(self, client_id: int, round_index: int, step: int, tensors: list[torch.Tensor]) -> Reply:
        vector, weight = P.expect_tensors(tensors, 2, f"client {client_id}", "agg_upload")
        if weight.dtype != torch.float64 or weight.shape != (1,):
            raise InvalidMessageError(f"client {client_id}: aggregation weight must be a float64 tensor of shape [1]")
        return self.server.aggregation_upload(client_id, round_index, step, vector, float(weight.item()))

    def _leave(self, client_id: int, round_index: int, step: int, tensors: list[torch.Tensor]) -> Reply:
        (payload,) = P.expect_tensors(tensors, 1, f"client {client_id}", "leave")
        metrics = P.json_value(payload, f"client {client_id}: leave")
        if not isinstance(metrics, dict) or not all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in metrics.items()):
            raise InvalidMessageError(f"client {client_id}: leave must carry a JSON object of numbers")
        self.server.leave(client_id, metrics)
        return []


def _client_id(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidMessageError(f"client id must be an integer >= 0, got {value!r}")
    return value


def _kind(value: object) -> str:
    if not isinstance(value, str) or value not in P.REPLY_KIND:
        raise InvalidMessageError(f"unknown message kind {value!r}; known: {sorted(P.REPLY_KIND)}")
    return value  # type: ignore[return-value]


def _then(result: Any, to_reply: Callable[[Any], list[torch.Tensor]]) -> Reply:
    """The reply made of a server method's result, or of its future (client-batching answers later)."""
    if isinstance(result, torch._C.Future):
        return result.then(lambda done: to_reply(done.wait()))
    return to_reply(result)


def _chain(result: Any, after: Callable[[Any], Reply]) -> Reply:
    """``after(result)``, once ``result`` (a value or a future) is there; one future even when
    ``after`` answers with a future of its own."""
    if not isinstance(result, torch._C.Future):
        return after(result)
    out: Future = Future()

    def settle(done: torch._C.Future) -> None:
        try:
            out.set_result(done.wait())
        except Exception as exc:  # noqa: BLE001 - the caller hears why
            out.set_exception(exc)

    def first(done: torch._C.Future) -> None:
        try:
            reply = after(done.wait())
        except Exception as exc:  # noqa: BLE001
            out.set_exception(exc)
            return
        if isinstance(reply, torch._C.Future):
            reply.add_done_callback(settle)
        else:
            out.set_result(reply)

    result.add_done_callback(first)
    return out


def _as_future(reply: Reply) -> Future:
    # ``Future.then`` returns the C++ base class, not ``torch.futures.Future``.
    return reply if isinstance(reply, torch._C.Future) else _done(reply)
