"""The client-server protocol: message kinds and how each call's values become tensors.

Every call is one message of a *kind* carrying a few tensors plus two integers (``round``
and ``step``), and is answered by one message. The same messages travel in the clear
(``crypto.enabled=false``) or sealed (:mod:`flglm.crypto`), so encryption cannot change what
is computed. A message's kind, round and step identify it among its client's messages, so a
resent or duplicated one is answered from the server's record (:mod:`flglm.server.exactly_once`).
Small values travel as tensors too: control numbers as an int64/float64 vector,
structured data (fingerprints, server facts, metrics) as UTF-8 JSON in a uint8 tensor, never
pickled.

==========  =========================================  ===========  ==========================
kind        request tensors (round, step)              reply kind   reply tensors
==========  =========================================  ===========  ==========================
join        [json fingerprints, incarnation]           welcome      [json server facts]
forward     [hidden, mask, positions, ctrl(, prefix)]  output       [hidden]
            (step=id; prefix: P-tuning v2 key/values of the server's blocks; with a
            narrower ``link.wire_dtype`` every hidden/grad here takes 3 tensors, WireCodec)
infer       [hidden, mask, positions, ctrl(, prefix)]  output       [hidden]
decode      [hidden, mask, positions, ctrl2(, prefix)] output       [hidden]
            (round=session, step=id; mask covers cached + new tokens; ctrl2: autocast, cached;
            prefix with a session's first step only)
decode_end  [] (round=session)                         ack          []
backward    [grad of output] (step=id)                 grad_in      [grad of input(, grad of prefix)]
backward_s  [grad of output, step ctrl] (step=id)      grad_in      as ``backward``
            (kind ``backward_step``: the backward of a step's last pending forward with that
            optimizer step folded in; the server backpropagates, steps, then answers)
grad_norms  []                                         norms        [per-parameter norms]
step        [ctrl float64: step, total, scale, clip]   ack          []
            (step=the client's optimizer step)
agg_begin   [int64: fits] (round)                      agg_plan     [int64: attempt, bits, ids...]
            (fits: 1 if the client's values fit a 32-bit masked upload; bits: the plan's width)
agg_upload  [vector, weight] (round, step=attempt)     agg_result   [int64 status, vector]
leave       [json metrics]                             ack          []
==========  =========================================  ===========  ==========================

A training step is two round trips when the server's optimizer step can be folded into the
backward before it: no clipping by global norm (which needs ``grad_norms`` in between) and no
gradient accumulation; otherwise three or four (``forward``, ``backward``, ``grad_norms``,
``step``). The backward is the fold's place rather than the next forward: the server steps and
hands its turn on at once, no step waits across validation, a FedAvg round or a checkpoint,
and the backward's own key makes the pair exactly-once.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import torch

from flglm.link.messages import AUTOCAST_DTYPES, InvalidMessageError

REPLY_KIND: dict[str, str] = {
    "join": "welcome",
    "forward": "output",
    "infer": "output",
    "decode": "output",
    "decode_end": "ack",
    "backward": "grad_in",
    "backward_step": "grad_in",
    "grad_norms": "norms",
    "step": "ack",
    "agg_begin": "agg_plan",
    "agg_upload": "agg_result",
    "leave": "ack",
}
"""Request kind -> kind of its answer."""

TRAINING_STEP_KINDS: frozenset[str] = frozenset({"forward", "backward", "backward_step", "grad_norms", "step"})
"""The messages of a training step: their count over the clients' optimizer steps is ``round_trips_per_step``."""
OPTIMIZER_STEP_KINDS: frozenset[str] = frozenset({"step", "backward_step"})
"""One of these per optimizer step of a client."""

WIRE_KINDS: tuple[str, ...] = (
    "join",
    "welcome",
    "forward",
    "infer",
    "output",
    "backward",
    "grad_in",
    "grad_norms",
    "norms",
    "step",
    "ack",
    "agg_begin",
    "agg_plan",
    "agg_upload",
    "agg_result",
    "leave",
    "test",
    "decode",
    "decode_end",
    "backward_step",
)
"""Every request and answer kind, in the order of their codes on the wire (a sealed message's
header carries the index): a new kind goes at the end. ``test`` is sealed by the crypto tests
only; the endpoint handles no such kind."""

KINDS: tuple[str, ...] = tuple(kind for kind in WIRE_KINDS if kind in REPLY_KIND)
"""The request kinds, in wire-code order (the socket link's frames carry index + 1; 0: none)."""


def round_trips_per_step(training_messages: int, optimizer_steps: int) -> float:
    """Round trips of a training step, over every client's steps (0 before the first step)."""
    return round(training_messages / optimizer_steps, 3) if optimizer_steps else 0.0


AUTOCAST_CODES = list(AUTOCAST_DTYPES)
MAX_JSON_BYTES = 1 << 16


def json_tensor(value: Any) -> torch.Tensor:
    data = json.dumps(value, sort_keys=True, allow_nan=False).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def json_value(tensor: object, what: str) -> Any:
    """Parse JSON a peer sent (size-limited; JSON only, never pickle)."""
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise InvalidMessageError(f"{what} must be a 1-D uint8 tensor of JSON")
    if tensor.numel() > MAX_JSON_BYTES:
        raise InvalidMessageError(f"{what} is {tensor.numel()} bytes, at most {MAX_JSON_BYTES} allowed")
    try:
        return json.loads(tensor.numpy().tobytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, too deep, too many digits
        raise InvalidMessageError(f"{what} is not valid JSON: {str(exc)[:200]}") from None


def autocast_code(autocast: str) -> torch.Tensor:
    return torch.tensor([AUTOCAST_CODES.index(autocast)], dtype=torch.int64)


def autocast_name(ctrl: object, who: str) -> str:
    if not isinstance(ctrl, torch.Tensor) or ctrl.dtype != torch.int64 or ctrl.shape != (1,):
        raise InvalidMessageError(f"{who}: forward control must be an int64 tensor of shape [1]")
    code = int(ctrl.item())
    if not 0 <= code < len(AUTOCAST_CODES):
        raise InvalidMessageError(f"{who}: autocast code {code} is not one of 0..{len(AUTOCAST_CODES) - 1}")
    return AUTOCAST_CODES[code]


def decode_control(autocast: str, past: int) -> torch.Tensor:
    return torch.tensor([AUTOCAST_CODES.index(autocast), int(past)], dtype=torch.int64)


def parse_decode_control(ctrl: object, who: str) -> tuple[str, int]:
    """(autocast dtype name, number of tokens the session's cache already holds)."""
    if not isinstance(ctrl, torch.Tensor) or ctrl.dtype != torch.int64 or ctrl.shape != (2,):
        raise InvalidMessageError(f"{who}: decode control must be an int64 tensor of shape [2]")
    past = int(ctrl[1].item())
    if past < 0:
        raise InvalidMessageError(f"{who}: cached token count must be >= 0, got {past}")
    return autocast_name(ctrl[:1], who), past


def step_control(client_step: int, total_steps: int, grad_scale: float, clip_value: float | None) -> torch.Tensor:
    clip = math.nan if clip_value is None else float(clip_value)
    return torch.tensor([float(client_step), float(total_steps), float(grad_scale), clip], dtype=torch.float64)


def parse_step_control(ctrl: object, who: str) -> tuple[int, int, float, float | None]:
    if not isinstance(ctrl, torch.Tensor) or ctrl.dtype != torch.float64 or ctrl.shape != (4,):
        raise InvalidMessageError(f"{who}: step control must be a float64 tensor of shape [4]")
    step, total, scale, clip = (float(v) for v in ctrl.tolist())
    if not (math.isfinite(step) and math.isfinite(total) and step >= 0 and total >= 0 and step == int(step) and total == int(total)):
        raise InvalidMessageError(f"{who}: step index and total steps must be integers >= 0, got {step}, {total}")
    if not (math.isfinite(scale) and 0 <= scale <= 1):
        raise InvalidMessageError(f"{who}: gradient scale must lie in [0, 1], got {scale}")
    if not math.isnan(clip) and not (math.isfinite(clip) and clip > 0):
        raise InvalidMessageError(f"{who}: clip value must be > 0 (or NaN for none), got {clip}")
    return int(step), int(total), scale, None if math.isnan(clip) else clip


def crossing_tensors(tensors: object, who: str, kind: str, *, hidden_parts: int = 1) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A crossing's [hidden, mask, positions, ctrl] and the optional P-tuning prefixes after them
    (``hidden_parts``: the tensors the hidden states take in ``link.wire_dtype``, see ``WireCodec``)."""
    count = len(tensors) if isinstance(tensors, (list, tuple)) else 0
    base = hidden_parts + 3
    values = expect_tensors(tensors, base + 1 if count == base + 1 else base, who, kind)
    return values[:base], (values[base] if len(values) == base + 1 else None)


def expect_tensors(tensors: object, count: int, who: str, kind: str) -> list[torch.Tensor]:
    if not isinstance(tensors, (list, tuple)) or len(tensors) != count or not all(isinstance(t, torch.Tensor) for t in tensors):
        got = f"{len(tensors)} values" if isinstance(tensors, (list, tuple)) else type(tensors).__name__
        raise InvalidMessageError(f"{who}: a {kind!r} message carries {count} tensors, got {got}")
    return list(tensors)


_STATUS = {"done": 0, "redo": 1}


class WirePlan(NamedTuple):
    """A secure round's plan as a client reads it: mask for ``participants``, ``bits`` wide."""

    attempt: int
    participants: list[int]
    bits: int


def begin_tensor(fits_narrow: bool) -> torch.Tensor:
    """``agg_begin``'s payload: int64 [1 if the client's values fit a narrow upload, else 0]."""
    return torch.tensor([int(fits_narrow)], dtype=torch.int64)


def parse_begin(tensor: torch.Tensor, who: str) -> bool:
    if tensor.dtype != torch.int64 or tensor.shape != (1,) or int(tensor[0]) not in (0, 1):
        raise InvalidMessageError(f"{who}: agg_begin carries an int64 tensor [0 or 1] (fits a narrow upload)")
    return bool(tensor[0])


def plan_tensor(plan: Any) -> torch.Tensor:
    """A secure round's plan: int64 [attempt, bits, participant ids...]."""
    return torch.tensor([int(plan.attempt), int(plan.bits), *(int(i) for i in plan.participants)], dtype=torch.int64)


def parse_plan(tensor: object) -> WirePlan:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int64 or tensor.dim() != 1 or tensor.numel() < 3:
        raise InvalidMessageError("an aggregation plan must be an int64 tensor [attempt, bits, participant ids...]")
    attempt, bits, *participants = (int(v) for v in tensor.tolist())
    return WirePlan(attempt, participants, bits)


def result_tensors(result: Any) -> list[torch.Tensor]:
    """A secure round's answer: int64 [status, attempt, bits, participant ids...] and the average (empty on redo)."""
    status = torch.cat([torch.tensor([_STATUS[result.status]], dtype=torch.int64), plan_tensor(result.plan)])
    average = result.average if result.average is not None else torch.zeros(0)
    return [status, average]


def plain_result_tensors(average: torch.Tensor) -> list[torch.Tensor]:
    """Plain FedAvg's answer in the same form: status done, attempt 0, no plan."""
    return [torch.tensor([_STATUS["done"], 0, 64], dtype=torch.int64), average]


def parse_result(status: object, average: object) -> tuple[torch.Tensor | None, WirePlan]:
    """(average or None on redo, the plan); plain FedAvg answers [0, 0, 64]."""
    if not isinstance(status, torch.Tensor) or status.dtype != torch.int64 or status.dim() != 1 or status.numel() < 3:
        raise InvalidMessageError("an aggregation result must start with an int64 status tensor")
    if not isinstance(average, torch.Tensor):
        raise InvalidMessageError("an aggregation result must carry a tensor")
    code, attempt, bits, *participants = (int(v) for v in status.tolist())
    if code not in _STATUS.values():
        raise InvalidMessageError(f"unknown aggregation status {code}")
    return (average if code == _STATUS["done"] else None), WirePlan(attempt, participants, bits)
