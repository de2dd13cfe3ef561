"""What may cross the client-server link, and the checks the server applies before use.

Only hidden states, the padding mask, position ids and the gradient of hidden states cross.
Every tensor a peer sends is checked for type, dtype, shape, size and finiteness before it
touches the model, so a malformed message is rejected with an error that names what is
wrong, and the server's state is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MASK_DTYPES = (torch.int64, torch.int32, torch.bool, torch.uint8)
AUTOCAST_DTYPES = {"": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


class InvalidMessageError(ValueError):
    """A message from a peer failed validation; nothing was changed."""


@dataclass(frozen=True)
class RequestHeader:
    """Identifies one forward/backward pair: which client, which of its requests."""

    client_id: int
    request_id: int
    autocast: str = ""
    """Autocast dtype the client runs under ("" for none), so the server computes alike."""

    def describe(self) -> str:
        return f"client {self.client_id} request {self.request_id}"


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_header(header: object) -> RequestHeader:
    if not isinstance(header, RequestHeader):
        raise InvalidMessageError(f"expected a RequestHeader, got {type(header).__name__}")
    if not isinstance(header.client_id, int) or not isinstance(header.request_id, int):
        raise InvalidMessageError(f"header ids must be integers, got {header!r}")
    if header.autocast not in AUTOCAST_DTYPES:
        raise InvalidMessageError(f"header autocast={header.autocast!r} is not one of {list(AUTOCAST_DTYPES)}")
    return header


def check_forward(
    header: RequestHeader,
    hidden: object,
    attention_mask: object,
    position_ids: object,
    *,
    hidden_size: int,
    max_batch_size: int,
    max_positions: int | None,
    mask_length: int | None = None,
) -> None:
    """Validate a forward request; raises InvalidMessageError naming the first problem.

    ``mask_length``: the attention mask's expected width when it also covers cached tokens
    (generation: cached + new); by default the hidden states' length."""
    who = header.describe()
    for name, value in (("hidden states", hidden), ("attention mask", attention_mask), ("position ids", position_ids)):
        if not isinstance(value, torch.Tensor):
            raise InvalidMessageError(f"{who}: {name} must be a tensor, got {type(value).__name__}")
    assert isinstance(hidden, torch.Tensor) and isinstance(attention_mask, torch.Tensor)
    assert isinstance(position_ids, torch.Tensor)
    if hidden.dtype not in FLOAT_DTYPES or hidden.dim() != 3 or hidden.shape[-1] != hidden_size:
        raise InvalidMessageError(
            f"{who}: hidden states must be float32/bfloat16/float16 of shape [batch, seq, {hidden_size}], got {hidden.dtype} {_shape(hidden)}"
        )
    batch, length, _ = hidden.shape
    if batch < 1 or length < 1:
        raise InvalidMessageError(f"{who}: hidden states are empty: {_shape(hidden)}")
    if batch > max_batch_size:
        raise InvalidMessageError(f"{who}: batch of {batch} exceeds server.max_batch_size={max_batch_size}")
    if max_positions is not None and length > max_positions:
        raise InvalidMessageError(f"{who}: sequence length {length} exceeds the model's limit of {max_positions}")
    width = length if mask_length is None else mask_length
    if max_positions is not None and width > max_positions:
        raise InvalidMessageError(f"{who}: {width} tokens with the cached ones exceed the model's limit of {max_positions}")
    if attention_mask.dtype not in MASK_DTYPES or _shape(attention_mask) != [batch, width]:
        raise InvalidMessageError(
            f"{who}: attention mask must be an integer or bool tensor of shape [{batch}, {width}], "
            f"got {attention_mask.dtype} {_shape(attention_mask)}"
        )
    if attention_mask.numel() and (attention_mask.min() < 0 or attention_mask.max() > 1):
        raise InvalidMessageError(f"{who}: attention mask values must be 0 or 1")
    if position_ids.dtype != torch.int64 or position_ids.dim() != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch):
        raise InvalidMessageError(
            f"{who}: position ids must be int64 of shape [{batch} or 1, {length}], got {position_ids.dtype} {_shape(position_ids)}"
        )
    if position_ids.min() < 0 or (max_positions is not None and position_ids.max() >= max_positions):
        raise InvalidMessageError(f"{who}: position ids must lie in [0, {max_positions})")
    if not torch.isfinite(hidden).all():
        raise InvalidMessageError(f"{who}: hidden states contain NaN or Inf")


MAX_PREFIX_LENGTH = 4096


def check_prefix(header: RequestHeader, prefix: object, *, layers: int, kv_heads: int, head_dim: int) -> None:
    """P-tuning v2 prefixes of the server's blocks: ``[layers, 2, kv_heads, length, head_dim]``, finite."""
    who = header.describe()
    if not isinstance(prefix, torch.Tensor) or prefix.dtype not in FLOAT_DTYPES or prefix.dim() != 5:
        got = f"{prefix.dtype} {_shape(prefix)}" if isinstance(prefix, torch.Tensor) else type(prefix).__name__
        raise InvalidMessageError(f"{who}: prefixes must be a float tensor [layers, 2, kv_heads, length, head_dim], got {got}")
    layers_, two, heads, length, dim = prefix.shape
    if (layers_, two, heads, dim) != (layers, 2, kv_heads, head_dim) or not 1 <= length <= MAX_PREFIX_LENGTH:
        raise InvalidMessageError(
            f"{who}: prefixes must have shape [{layers}, 2, {kv_heads}, 1..{MAX_PREFIX_LENGTH}, {head_dim}], got {_shape(prefix)}"
        )
    if not torch.isfinite(prefix).all():
        raise InvalidMessageError(f"{who}: prefixes contain NaN or Inf")


def check_gradient(header: RequestHeader, grad: object, expected: torch.Tensor) -> None:
    """A gradient must match the output it is the gradient of."""
    who = header.describe()
    if not isinstance(grad, torch.Tensor):
        raise InvalidMessageError(f"{who}: gradient must be a tensor, got {type(grad).__name__}")
    if grad.dtype not in FLOAT_DTYPES or grad.shape != expected.shape:
        raise InvalidMessageError(f"{who}: gradient must be float of shape {_shape(expected)}, got {grad.dtype} {_shape(grad)}")
    if not torch.isfinite(grad).all():
        raise InvalidMessageError(f"{who}: gradient contains NaN or Inf")


def nbytes(*tensors: torch.Tensor) -> int:
    """Raw bytes of the tensors' elements (what a message carries, before any header)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def wire(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, compact tensor to send: RPC sends a view's whole storage otherwise."""
    tensor = tensor.detach()
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone(memory_format=torch.contiguous_format)  # a size-1 view may keep a stride != 1
    return tensor
