"""Secure aggregation of client-block updates: pairwise additive masks, so the server sees only the sum.

Bonawitz et al. (CCS 2017), reduced to the honest-but-curious server with clients that may leave:

* Every pair of clients ``i < j`` shares a 32-byte secret (X25519 of their identity keys, then HKDF).
* For round ``r`` and attempt ``a`` the pair expands it into a mask (AES-256-CTR keystream under a key
  derived from the secret, ``r`` and ``a``). Client ``i`` adds the mask, client ``j`` subtracts it.
* Each client uploads ``encode([w * x, w])`` plus its masks, in wrapping int64 arithmetic. Every mask
  appears once with each sign, so the sum of all uploads is ``encode([sum(w * x), sum(w)])`` and each
  single upload is uniformly random to the server.
* Narrow uploads: if at the round's start every participant's encodings are below ``2**31 / N`` in
  magnitude (``N`` the federation's listed clients), the plan says so and each upload travels as its
  low 32 bits (int32, half the bytes). Masks cancel modulo ``2**32`` as well, and the sum fits, so
  the average is bit for bit the 64-bit one. The price: the server learns per client and round one
  bit, whether its values were below that bound (``crypto.narrow_uploads: false`` keeps 64 bits).
* If a participant leaves before uploading, its masks cannot cancel. Instead of the paper's secret-shared
  mask recovery, the round is redone (``attempt + 1``) without it; fresh masks per attempt keep the two
  uploads of a client unrelated.

The server learns the weighted average and the total weight, nothing else about a single upload. Not
covered: a malicious server that lies about who left (it could isolate a client by redoing a round with
that client alone), and clients that collude with the server. A one-client plan is sent in the clear:
the "sum" of one update is that update, which the result reveals anyway.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Collection, Mapping, Sequence

import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flglm.crypto.keys import KEY_BYTES, public_key_bytes

FIXED_POINT_BITS = 24
"""Fractional bits of the fixed-point encoding: a resolution of 2**-24 (about 6e-8) per encoded value."""

MAX_CLIENTS = 1024
"""Most participants whose encoded values may be summed without leaving the int64 range."""

ENCODE_BOUND = 2.0 ** (62 - FIXED_POINT_BITS) / MAX_CLIENTS
"""Encoded values (``w * x`` and ``w``) must satisfy ``|v| < 2**28`` (about 2.7e8).

Then the sum of ``MAX_CLIENTS`` encodings stays below ``2**62`` in magnitude, a factor two inside int64,
so the unmasked sum never wraps. With sample-count weights that allows e.g. ``|x| < 268`` at ``w = 1e6``.
"""

WIDE_BITS = 64
"""Width of an upload in the ring every value fits."""

NARROW_BITS = 32
"""Width of an upload when every participant's encodings fit (see :func:`fits_narrow`)."""

UPLOAD_DTYPES = {WIDE_BITS: torch.int64, NARROW_BITS: torch.int32}
"""The wire dtype of a masked upload of each width."""

SECRET_BYTES = 32
"""Length of a pairwise secret."""

_SCALE = float(2**FIXED_POINT_BITS)
_ZEROS = bytes(1 << 18)  # AES-CTR of zeros is the keystream; a cache-sized source avoids an 8*numel-byte one.
_LITTLE_ENDIAN = sys.byteorder == "little"


def encode(vector: torch.Tensor) -> torch.Tensor:
    """``round(x * 2**FIXED_POINT_BITS)`` as int64; refuse values whose sum over clients could overflow."""
    if not vector.is_floating_point():
        raise ValueError(f"encode needs a float tensor, got {vector.dtype}")
    values = vector.detach().to(torch.float64)
    outside = ~(values.abs() < ENCODE_BOUND)  # negated so that nan counts as outside
    if outside.any():
        index = int(outside.flatten().nonzero()[0, 0])
        magnitude = abs(float(values.flatten()[index]))
        raise ValueError(
            f"value of magnitude {magnitude:.6g} at index {index} is outside the secure-aggregation range "
            f"|v| < {ENCODE_BOUND:.6g} (2**{62 - FIXED_POINT_BITS} / {MAX_CLIENTS} clients at {FIXED_POINT_BITS} fractional bits)"
        )
    return torch.round(values * _SCALE).to(torch.int64)


def fits_narrow(vector: torch.Tensor, weight: float, *, max_participants: int) -> bool:
    """Whether ``encode([weight * vector, weight])`` of each of up to ``max_participants`` clients sums
    within the signed :data:`NARROW_BITS` range (each encoding below ``2**31 / max_participants``)."""
    if max_participants < 1:
        raise ValueError(f"max_participants must be >= 1, got {max_participants}")
    bound = 2.0 ** (NARROW_BITS - 1 - FIXED_POINT_BITS) / max_participants
    weighted = float(vector.detach().abs().max()) * abs(float(weight)) if vector.numel() else 0.0
    return all(math.isfinite(v) and v < bound for v in (weighted, abs(float(weight))))  # nan fails both tests


def plan_bits(participants: Collection[int], fitting: Collection[int]) -> int:
    """The width of a round's uploads: narrow only if every participant said its values fit."""
    return NARROW_BITS if participants and set(participants) <= set(fitting) else WIDE_BITS


def to_width(upload: torch.Tensor, bits: int) -> torch.Tensor:
    """A wrapping int64 upload as its low ``bits`` bits, in that width's dtype (two's complement)."""
    dtype = _upload_dtype(bits)
    if bits == WIDE_BITS:
        return upload
    low = upload & (2**bits - 1)
    return torch.where(low >= 2 ** (bits - 1), low - 2**bits, low).to(dtype)


def decode(encoded: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode`, in float64 (exact up to float64 rounding of the int64 sum)."""
    if encoded.dtype != torch.int64:
        raise ValueError(f"decode needs an int64 tensor, got {encoded.dtype}")
    return encoded.to(torch.float64) / _SCALE


def pairwise_secret(my_private: X25519PrivateKey, peer_public: bytes, *, my_id: int, peer_id: int) -> bytes:
    """The 32 bytes clients ``my_id`` and ``peer_id`` share; both sides derive the same value.

    The HKDF info binds both ids and both public keys, ordered by id, so the secret of one pair cannot
    stand in for another pair's even if the same keys were reused under other ids.
    """
    for name, value in (("my_id", my_id), ("peer_id", peer_id)):
        if not 0 <= value < 2**63:
            raise ValueError(f"{name} must be in [0, 2**63), got {value}")
    if my_id == peer_id:
        raise ValueError(f"a client has no pairwise secret with itself (both ids are {my_id})")
    if len(peer_public) != KEY_BYTES:
        raise ValueError(f"public key of client {peer_id} has {len(peer_public)} bytes, expected {KEY_BYTES}")
    shared = my_private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    keys = {my_id: public_key_bytes(my_private), peer_id: bytes(peer_public)}
    low, high = sorted(keys)
    info = b"flglm pairwise mask secret" + low.to_bytes(8, "big") + high.to_bytes(8, "big") + keys[low] + keys[high]
    return HKDF(algorithm=hashes.SHA256(), length=SECRET_BYTES, salt=None, info=info).derive(shared)


def pair_mask(secret: bytes, *, round_index: int, attempt: int, numel: int) -> torch.Tensor:
    """``numel`` int64 values, uniform over all 2**64, from ``secret`` for this round and attempt.

    A fresh AES key per (round, attempt) means a mask is never reused, so the zero nonce is safe.
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"pairwise secret has {len(secret)} bytes, expected {SECRET_BYTES}")
    for name, value in (("round_index", round_index), ("attempt", attempt), ("numel", numel)):
        if not 0 <= value < 2**63:
            raise ValueError(f"{name} must be in [0, 2**63), got {value}")
    info = b"flglm mask" + round_index.to_bytes(8, "big") + attempt.to_bytes(8, "big")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(bytes(secret))
    if numel == 0:
        return torch.empty(0, dtype=torch.int64)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    total = 8 * numel
    # 15 spare bytes: older cryptography releases want block_size - 1 bytes of room in update_into.
    out = bytearray(total + 15)
    view = memoryview(out)
    zeros = memoryview(_ZEROS)
    offset = 0
    while offset < total:
        offset += encryptor.update_into(zeros[: min(len(zeros), total - offset)], view[offset:])
    mask = torch.frombuffer(out, dtype=torch.int64, count=numel)
    if not _LITTLE_ENDIAN:  # the keystream is read as little-endian words on every host, so peers agree
        mask = torch.frombuffer(out, dtype=torch.uint8, count=total).view(numel, 8).flip(1).contiguous().view(torch.int64).flatten()
    return mask


def masked_upload(
    vector: torch.Tensor,
    weight: float,
    *,
    client_id: int,
    participants: Sequence[int],
    secrets: Mapping[int, bytes],
    round_index: int,
    attempt: int,
    bits: int = WIDE_BITS,
) -> torch.Tensor:
    """``encode([weight * vector, weight])`` plus this client's pair masks: ``numel + 1`` values,
    int64, or their low 32 bits as int32 when the round's plan is ``bits=32`` wide.

    The mask shared with peer ``j`` is added if ``client_id < j`` and subtracted otherwise, so it cancels
    in the sum over all participants (int64 addition wraps, which keeps the cancellation exact, and
    so does its reduction modulo ``2**32``).
    """
    if vector.dim() != 1 or not vector.is_floating_point():
        raise ValueError(f"client {client_id}: secure aggregation needs a 1-D float tensor, got {vector.dtype} {list(vector.shape)}")
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"client {client_id}: aggregation weight must be finite and >= 0, got {weight}")
    if len(set(participants)) != len(participants):
        raise ValueError(f"participants list repeats a client: {list(participants)}")
    if client_id not in participants:
        raise ValueError(f"client {client_id} is not among the participants {sorted(participants)}")
    if len(participants) < 2:
        # One participant has no peer to mask with; sending "masked" data would only pretend to hide it.
        raise ValueError(f"client {client_id} is the only participant: a lone update cannot be masked, upload it in the clear")
    peers = sorted(p for p in participants if p != client_id)
    missing = [p for p in peers if p not in secrets]
    if missing:
        raise ValueError(f"client {client_id} has no pairwise secret with peer(s) {missing}")
    if bits == NARROW_BITS and not fits_narrow(vector, weight, max_participants=len(participants)):
        raise ValueError(f"client {client_id}: weight * vector does not fit a {bits}-bit upload of {len(participants)} participants")
    plain = torch.cat([vector.detach().to(torch.float64) * float(weight), torch.tensor([float(weight)], dtype=torch.float64)])
    try:
        upload = encode(plain)
    except ValueError as error:
        raise ValueError(f"client {client_id}: weight * vector: {error}") from None
    for peer in peers:
        mask = pair_mask(secrets[peer], round_index=round_index, attempt=attempt, numel=upload.numel())
        if client_id < peer:
            upload += mask
        else:
            upload -= mask
    return to_width(upload, bits)


def unmask_average(uploads: Sequence[torch.Tensor], *, bits: int = WIDE_BITS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``sum(w * x) / sum(w)`` from the masked uploads, ``bits`` wide, of every participant of one (round, attempt)."""
    if not uploads:
        raise ValueError("unmask_average needs at least one upload")
    if len(uploads) > MAX_CLIENTS:
        raise ValueError(f"{len(uploads)} uploads exceed the {MAX_CLIENTS} clients the fixed-point range allows")
    sizes = {u.numel() for u in uploads}
    expected = _upload_dtype(bits)
    if any(u.dtype != expected or u.dim() != 1 for u in uploads) or len(sizes) != 1 or sizes == {0}:
        shapes = sorted({(str(u.dtype), tuple(u.shape)) for u in uploads})
        raise ValueError(f"uploads must be equally long, non-empty 1-D {expected} tensors, got {shapes}")
    total = torch.zeros(uploads[0].numel(), dtype=torch.int64)
    for upload in uploads:
        total += upload  # int32 uploads widen: their sum cannot wrap int64
    return unmask_sum(total, participants=len(uploads), bits=bits, dtype=dtype)


def unmask_sum(total: torch.Tensor, *, participants: int, bits: int = WIDE_BITS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``sum(w * x) / sum(w)`` from the int64 sum of all ``participants`` masked uploads, each ``bits``
    wide (hierarchical serving adds the sub-servers' partial sums first); the sum is taken modulo
    ``2**bits`` before decoding."""
    if total.dtype != torch.int64 or total.dim() != 1 or total.numel() == 0:
        raise ValueError(f"the sum of masked uploads must be a non-empty 1-D int64 tensor, got {total.dtype} {list(total.shape)}")
    decoded = decode(to_width(total, bits).to(torch.int64))
    weight = float(decoded[-1])
    if weight < 0 or weight >= participants * ENCODE_BOUND:
        # An honest sum lies in [0, n * bound); outside it the masks did not cancel.
        raise ValueError(f"total weight {weight:.6g} is impossible: the masks did not cancel (uploads of different plans or secrets?)")
    if weight == 0:
        raise ValueError("no samples were contributed: the total weight of the round is 0")
    return (decoded[:-1] / weight).to(dtype)


def _upload_dtype(bits: int) -> torch.dtype:
    if bits not in UPLOAD_DTYPES:
        raise ValueError(f"an upload is {NARROW_BITS} or {WIDE_BITS} bits wide, not {bits}")
    return UPLOAD_DTYPES[bits]


class PairwiseMasker:
    """A client's masking for secure aggregation: its pairwise secrets with every peer, made once."""

    def __init__(self, client_id: int, identity: X25519PrivateKey, peer_keys: Mapping[int, bytes], *, narrow: bool = True) -> None:
        self.client_id = client_id
        self.narrow = narrow
        """Ask for narrow uploads when they fit (``crypto.narrow_uploads``)."""
        self._secrets = {peer: pairwise_secret(identity, key, my_id=client_id, peer_id=peer) for peer, key in peer_keys.items() if peer != client_id}

    def fits_narrow(self, vector: torch.Tensor, weight: float) -> bool:
        """Whether this upload may go :data:`NARROW_BITS` wide, however many of the listed clients take part."""
        return self.narrow and fits_narrow(vector, weight, max_participants=len(self._secrets) + 1)

    def mask(
        self, vector: torch.Tensor, weight: float, *, round_index: int, attempt: int, participants: Sequence[int], bits: int = WIDE_BITS
    ) -> torch.Tensor:
        """The masked upload of ``vector`` (weighted by ``weight``) for this round's participants, ``bits`` wide."""
        return masked_upload(
            vector,
            weight,
            client_id=self.client_id,
            participants=participants,
            secrets=self._secrets,
            round_index=round_index,
            attempt=attempt,
            bits=bits,
        )
