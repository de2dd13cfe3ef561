"""Wire precisions: every round trip's error stays within its stated bound, and bytes shrink as stated."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flglm.link.wire_precision import BLOCK, WIRE_DTYPES, WireCodec, WireTensor, decode, encode, error_bound


def _hidden(seed: int, shape: tuple[int, ...] = (4, 33, 96), scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * scale
    x.view(-1)[:: 97] *= 40.0  # outliers, as hidden states have: they set their block's scale
    return x


@pytest.mark.parametrize("wire_dtype", WIRE_DTYPES)
def test_a_round_trip_stays_within_the_bound(wire_dtype: str) -> None:
    x = _hidden(0)
    back = decode(encode(x, wire_dtype))
    assert back.shape == x.shape and back.dtype == torch.float32
    assert bool(((back - x).abs() <= error_bound(x, wire_dtype)).all())


def test_float32_is_exact() -> None:
    x = _hidden(1)
    assert torch.equal(decode(encode(x, "float32")), x)


def test_int8_error_is_bounded_by_half_a_step_of_its_own_block() -> None:
    """Computed here from the definition, not from the module's error_bound."""
    x = _hidden(2, (3, 50, 64))
    back = decode(encode(x, "int8"))
    flat, err = x.reshape(-1), (back - x).abs().reshape(-1)
    for start in range(0, flat.numel(), BLOCK):
        block = flat[start : start + BLOCK]
        step = float(block.abs().max()) / 127
        assert float(err[start : start + BLOCK].max()) <= step / 2 * (1 + 1e-5)
    # and it is a real quantisation, not a copy: most elements moved
    assert float((back != x).float().mean()) > 0.5


def test_bytes_on_the_wire_shrink_as_stated() -> None:
    x = _hidden(3, (8, 64, 256))
    raw = x.numel() * 4
    assert encode(x, "float32").nbytes() == raw
    assert encode(x, "bfloat16").nbytes() == raw // 2
    assert encode(x, "float16").nbytes() == raw // 2
    int8 = encode(x, "int8")
    assert int8.nbytes() == x.numel() + 4 * math.ceil(x.numel() / BLOCK)
    assert int8.nbytes() / raw <= 0.27


def test_zero_blocks_and_a_ragged_tail_round_trip() -> None:
    x = torch.zeros(2, 3, 70)
    x[1, 2, 69] = -5.0  # the last, partial block holds one value
    back = decode(encode(x, "int8"))
    assert torch.equal(back, x)


def test_the_receiver_keeps_the_senders_dtype() -> None:
    x = _hidden(4).to(torch.bfloat16)
    assert decode(encode(x, "int8"), dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("wire_dtype", ["bfloat16", "float16", "int8"])
def test_non_finite_values_are_refused_not_rounded(wire_dtype: str) -> None:
    x = _hidden(5)
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode(x, wire_dtype)


def test_values_beyond_float16_are_refused() -> None:
    with pytest.raises(ValueError, match="exceeds float16's range"):
        encode(torch.tensor([1.0, 7e4]), "float16")


def test_bad_settings_and_bad_wire_values_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="link.wire_dtype must be one of"):
        encode(torch.ones(3), "int4")
    with pytest.raises(ValueError, match="floating-point"):
        encode(torch.ones(3, dtype=torch.int64), "int8")
    values = encode(torch.ones(130), "int8").values
    with pytest.raises(ValueError, match="without their block scales"):
        decode(WireTensor(values))
    with pytest.raises(ValueError, match="need 3 float32 block scales"):
        decode(WireTensor(values, torch.ones(2)))
    with pytest.raises(ValueError, match="finite and >= 0"):
        decode(WireTensor(values, torch.tensor([1.0, -1.0, 1.0])))


@settings(max_examples=200, deadline=None)
@given(
    wire_dtype=st.sampled_from(WIRE_DTYPES),
    numel=st.integers(1, 300),
    magnitude=st.floats(1e-6, 1e3),  # 1e3 * randn stays inside float16
    seed=st.integers(0, 2**31 - 1),
)
def test_any_tensor_round_trips_within_the_bound(wire_dtype: str, numel: int, magnitude: float, seed: int) -> None:
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * magnitude
    back = decode(encode(x, wire_dtype))
    assert bool(((back - x).abs() <= error_bound(x, wire_dtype)).all())


@pytest.mark.parametrize("wire_dtype", WIRE_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_crossing_through_the_codec_stays_within_the_bound_in_the_senders_dtype(wire_dtype: str, dtype: torch.dtype) -> None:
    """What the link does with one hidden-state tensor: pack on the sender, unpack on the receiver."""
    x = _hidden(6).to(dtype)
    sender, receiver = WireCodec(wire_dtype), WireCodec(wire_dtype)
    parts = sender.pack(x)
    back, rest = receiver.unpack([*parts, torch.ones(2)], "peer", "hidden states")
    assert back.dtype == dtype and back.shape == x.shape and len(rest) == 1
    exact = x.float()
    bound = error_bound(exact, wire_dtype)
    if dtype == torch.bfloat16 and wire_dtype == "int8":  # the dequantised value is rounded to the sender's bf16 too
        bound = bound + error_bound(back.float(), "bfloat16")
    assert bool(((back.float() - exact).abs() <= bound).all())
    assert receiver.received_bytes == sender.sent_bytes and receiver.received_exact_bytes == sender.sent_exact_bytes == x.numel() * x.element_size()
    if wire_dtype == "float32":
        assert len(parts) == 1 and parts[0] is x  # the float32 wire sends the tensor itself, as before
