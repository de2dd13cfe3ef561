"""Narrower numbers on the wire: hidden states and gradients sent as bfloat16, float16 or int8.

On a slow link the bytes of each crossing, not the compute, set the step time (a 7B model at
batch 8 x 512 sends 33.5 MB per crossing in bf16). ``link.wire_dtype`` trades exactness for
bytes: ``float32`` sends what was computed; ``bfloat16``/``float16`` round each element;
``int8`` is blockwise absmax quantisation as Petals sends hidden states: every block of
``BLOCK`` consecutive elements is scaled by its largest magnitude into [-127, 127], and its
scale travels beside it (one float32 per block, 1/16 of the int8 payload at block 64).

Quantisation happens on the sender after the privacy defences and before sealing; the
receiver dequantises back to the sender's dtype. The bounds each encoding guarantees are in
:func:`error_bound`, and tested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

WireDtype = Literal["float32", "bfloat16", "float16", "int8"]
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
