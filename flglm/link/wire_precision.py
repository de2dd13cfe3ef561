"""Narrower numbers on the wire: hidden states and gradients sent as bfloat16, float16 or int8.

On a slow link the bytes of each crossing, not the compute, set the step time (a 7B model at
batch 8 x 512 sends 33.5 MB per crossing in bf16). ``link.wire_dtype`` trades exactness for
bytes: ``float32`` sends what was computed; ``bfloat16``/``float16`` round each element;
``int8`` is blockwise absmax quantisation as Petals sends hidden states: every block of
``BLOCK`` consecutive elements is scaled by its largest magnitude into [-127, 127], and its
scale travels beside it (one float32 per block, 1/16 of the int8 payload at block 64).

Quantisation happens on the sender after the privacy defences and before sealing; the
receiver dequantises back to the sender's dtype. The bounds each encoding guarantees are in
:func:`error_bound`, and tested. :class:`WireCodec` is what each side of the link uses: the
message tensors that carry one hidden-state or gradient tensor, and the bytes they cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

import torch

from flglm.config.schema import WireDtype
from flglm.link.messages import InvalidMessageError

WIRE_DTYPES: tuple[str, ...] = get_args(WireDtype)

BLOCK = 64
"""Elements per int8 block: one float32 scale per 64 int8 values (a 6.25% overhead)."""

_LEVELS = 127
_FLOAT16_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True)
class WireTensor:
    """What travels for one tensor: its values in the wire dtype and, for int8, the block scales."""

    values: torch.Tensor
    scales: torch.Tensor | None = None

    def nbytes(self) -> int:
        scales = self.scales.numel() * self.scales.element_size() if self.scales is not None else 0
        return self.values.numel() * self.values.element_size() + scales


def encode(tensor: torch.Tensor, wire_dtype: str) -> WireTensor:
    """``tensor`` (float32/bfloat16/float16) in the wire's precision.

    Raises:
        ValueError: an unknown wire dtype, a tensor that is not floating point or not finite,
            or (``float16``) a value beyond float16's range, which would arrive as infinity.
    """
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"link.wire_dtype must be one of {list(WIRE_DTYPES)}, got {wire_dtype!r}")
    if not tensor.is_floating_point():
        raise ValueError(f"only floating-point tensors are sent in a wire precision, got {tensor.dtype}")
    tensor = tensor.detach()
    if wire_dtype == "float32":
        return WireTensor(tensor.to(torch.float32))
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("a tensor holding NaN or Inf cannot be sent in a reduced wire precision")
    if wire_dtype == "bfloat16":
        return WireTensor(tensor.to(torch.bfloat16))
    if wire_dtype == "float16":
        largest = float(tensor.abs().max()) if tensor.numel() else 0.0
        if largest > _FLOAT16_MAX:
            raise ValueError(f"a value of magnitude {largest:.3g} exceeds float16's range ({_FLOAT16_MAX:.0f}); use bfloat16 or int8")
        return WireTensor(tensor.to(torch.float16))
    blocks = _blocks(tensor.to(torch.float32))
    scales = blocks.abs().amax(dim=1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    quantised = torch.round(blocks / safe.unsqueeze(1) * _LEVELS).clamp_(-_LEVELS, _LEVELS).to(torch.int8)
    values = quantised.reshape(-1)[: tensor.numel()].reshape(tensor.shape)
    return WireTensor(values.contiguous(), scales.contiguous())


def decode(wire: WireTensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The receiver's tensor, in ``dtype``, from what came over the wire.

    Raises:
        ValueError: int8 values without scales, or scales that do not fit the values' blocks.
    """
    if wire.values.dtype != torch.int8:
        return wire.values.to(dtype)
    if wire.scales is None:
        raise ValueError("int8 wire values came without their block scales")
    expected = math.ceil(wire.values.numel() / BLOCK)
    if wire.scales.dim() != 1 or wire.scales.numel() != expected or wire.scales.dtype != torch.float32:
        raise ValueError(
            f"int8 wire values of {wire.values.numel()} elements need {expected} float32 block scales, "
            f"got {wire.scales.dtype} {list(wire.scales.shape)}"
        )
    if not bool(torch.isfinite(wire.scales).all()) or bool((wire.scales < 0).any()):
        raise ValueError("int8 block scales must be finite and >= 0")
    blocks = _blocks(wire.values.to(torch.float32)) * (wire.scales / _LEVELS).unsqueeze(1)
    return blocks.reshape(-1)[: wire.values.numel()].reshape(wire.values.shape).to(dtype)


def error_bound(tensor: torch.Tensor, wire_dtype: str) -> torch.Tensor:
    """The largest error each element of ``tensor`` may have after an ``encode``/``decode`` round trip.

    int8: half a quantisation step of the element's block, ``absmax / 127 / 2``. bfloat16 and
    float16: half a unit in the last place of the nearest representable value, at most
    ``|x| * 2**-8`` (bf16, 8 significant bits) or ``|x| * 2**-11`` (fp16) for normal numbers,
    and half the smallest subnormal's spacing below that. float32: 0.
    """
    x = tensor.detach().to(torch.float32)
    if wire_dtype == "float32":
        return torch.zeros_like(x)
    if wire_dtype == "int8":
        scales = _blocks(x).abs().amax(dim=1, keepdim=True) / _LEVELS / 2
        per_element = scales.expand(-1, BLOCK).reshape(-1)[: x.numel()].reshape(x.shape)
        return per_element * (1 + 1e-6) + 1e-30
    info = torch.finfo(torch.bfloat16 if wire_dtype == "bfloat16" else torch.float16)
    relative = x.abs() * info.eps / 2  # eps is the spacing at 1: half of it is round-to-nearest's bound
    return torch.maximum(relative, torch.full_like(x, info.smallest_normal * info.eps / 2)) * (1 + 1e-6)


def _blocks(flat_source: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as rows of ``BLOCK``, the last row padded with zeros."""
    flat = flat_source.reshape(-1)
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK)


# ------------------------------------------------------------------ on the link
SOURCE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes a sender's tensor may have; a narrowed tensor's third part is the index of its own."""
_STORAGE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}


def parts_of(wire_dtype: str) -> int:
    """How many message tensors carry one hidden-state or gradient tensor: 1 (float32) or 3."""
    return 1 if wire_dtype == "float32" else 3


class WireCodec:
    """One side's encoder and decoder of the hidden states and gradients it sends and receives.

    ``float32``: a tensor travels as itself, as it always has (bit-identical messages).
    Narrower: as three tensors ``[values, scales, source]``: the values in the wire dtype,
    int8's float32 block scales (empty otherwise), and an int64 ``[code]`` naming the sender's
    dtype (:data:`SOURCE_DTYPES`) so that the receiver computes in the same dtype. A tensor
    holding NaN or Inf cannot be narrowed (:func:`encode`); it travels exact (values in its
    own dtype, no scales), so that the receiver's ``server.nonfinite`` policy treats it as
    with the float32 wire. The counters are what summary.json's ``link`` section reports.
    """

    def __init__(self, wire_dtype: str = "float32") -> None:
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"link.wire_dtype must be one of {list(WIRE_DTYPES)}, got {wire_dtype!r}")
        self.wire_dtype = wire_dtype
        self.sent_bytes = 0
        """Bytes of the message tensors that carried what this side sent (values, scales, source code)."""
        self.sent_exact_bytes = 0
        """The same tensors at the sender's own precision: what ``float32`` would have sent."""
        self.received_bytes = 0
        self.received_exact_bytes = 0

    def pack(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """The message tensors that carry ``tensor`` (see the class docstring).

        Raises:
            ValueError: a dtype outside :data:`SOURCE_DTYPES`, or (``float16``) a value beyond its range.
        """
        if self.wire_dtype == "float32":
            parts = [tensor]
        else:
            if tensor.dtype not in SOURCE_DTYPES:
                raise ValueError(f"only {[str(d) for d in SOURCE_DTYPES]} tensors cross in a wire precision, got {tensor.dtype}")
            source = torch.tensor([SOURCE_DTYPES.index(tensor.dtype)], dtype=torch.int64)
            if not bool(torch.isfinite(tensor).all()):
                parts = [tensor, torch.zeros(0), source]
            else:
                narrowed = encode(tensor, self.wire_dtype)
                parts = [narrowed.values, narrowed.scales if narrowed.scales is not None else torch.zeros(0), source]
        self.sent_bytes += _nbytes(parts)
        self.sent_exact_bytes += _nbytes([tensor])
        return parts

    def unpack(self, tensors: list[torch.Tensor], who: str, what: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The tensor :meth:`pack` put at the head of ``tensors``, at the sender's dtype, and the tensors after it.

        Raises:
            InvalidMessageError: the parts are missing or do not fit together; names ``who`` and ``what``.
        """
        value, rest = unpack(tensors, self.wire_dtype, who, what)
        self.received_bytes += _nbytes(list(tensors[: parts_of(self.wire_dtype)]))
        self.received_exact_bytes += _nbytes([value])
        return value, rest

    def summary(self, *, sent: str, received: str) -> dict[str, int | str]:
        """The counters under the names of the directions (``sent``/``received``: e.g. ``out``/``in``)."""
        return {
            "wire_dtype": self.wire_dtype,
            f"crossing_bytes_{sent}": self.sent_bytes,
            f"crossing_exact_bytes_{sent}": self.sent_exact_bytes,
            f"crossing_bytes_{received}": self.received_bytes,
            f"crossing_exact_bytes_{received}": self.received_exact_bytes,
        }


def unpack(tensors: list[torch.Tensor], wire_dtype: str, who: str, what: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:meth:`WireCodec.unpack` without the counting (for readers of recorded messages)."""
    width = parts_of(wire_dtype)
    if not isinstance(tensors, (list, tuple)) or len(tensors) < width or not all(isinstance(t, torch.Tensor) for t in tensors[:width]):
        raise InvalidMessageError(f"{who}: {what} must come as {width} tensor(s) (link.wire_dtype={wire_dtype})")
    parts, rest = list(tensors[:width]), list(tensors[width:])
    return (parts[0] if width == 1 else _decoded(parts, wire_dtype, who, what)), rest


def _decoded(parts: list[torch.Tensor], wire_dtype: str, who: str, what: str) -> torch.Tensor:
    values, scales, source = parts
    if source.dtype != torch.int64 or source.shape != (1,) or not 0 <= int(source.item()) < len(SOURCE_DTYPES):
        raise InvalidMessageError(f"{who}: {what}'s source dtype must be an int64 [code] in 0..{len(SOURCE_DTYPES) - 1}")
    dtype = SOURCE_DTYPES[int(source.item())]
    storage = _STORAGE[wire_dtype]
    exact = values.dtype == dtype and values.dtype != storage
    if values.dtype != storage and not exact:
        raise InvalidMessageError(f"{who}: {what} must be {storage} on a {wire_dtype} wire (or exact {dtype}), got {values.dtype}")
    if (exact or storage != torch.int8) and scales.numel():
        raise InvalidMessageError(f"{who}: {what} carries block scales, which only int8 values have")
    if exact:
        return values
    try:
        return decode(WireTensor(values, scales if storage == torch.int8 else None), dtype=dtype)
    except ValueError as exc:
        raise InvalidMessageError(f"{who}: {what}: {exc}") from None


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
