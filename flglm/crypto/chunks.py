"""Where each chunk of a sealed message lies: sealed message = header || (ciphertext || tag) per chunk.

The layout depends on the payload's size alone, so both ends agree whatever thread counts they
run; :mod:`flglm.crypto.channel` seals and opens by it, ``benchmarks/seal_threads.py`` times it.
"""

from __future__ import annotations

TAG_BYTES = 16
"""AES-GCM's tag, one per chunk."""

CHUNK_BYTES = 4 * 2**20
"""Payloads up to this size are sealed in one piece; larger ones in chunks of at least this size.

A 7B model's crossing (8 x 512 x 4096 bf16, 33.5 MB) is ~3.4 ms of AES-GCM on one core here
(~12 ms at the 2.7 GB/s of slower cores), four times a step; chunks let several threads share it
(benchmarks/seal_threads.py)."""
MAX_CHUNKS = 256
"""At most this many chunks (the chunk index is one nonce byte); larger payloads get larger chunks."""


def chunk_ranges(nbytes: int) -> list[tuple[int, int]]:
    """The byte ranges ``[start, stop)`` of a payload's chunks (one chunk up to :data:`CHUNK_BYTES`)."""
    if nbytes <= CHUNK_BYTES:
        return [(0, nbytes)]
    size = max(CHUNK_BYTES, -(-nbytes // MAX_CHUNKS))
    return [(start, min(start + size, nbytes)) for start in range(0, nbytes, size)]


def chunk_layout(header_bytes: int, payload_bytes: int) -> list[tuple[slice, slice]]:
    """Per chunk: its bytes in the payload, and its ciphertext || tag in the sealed message."""
    return [
        (slice(start, stop), slice(header_bytes + start + i * TAG_BYTES, header_bytes + stop + (i + 1) * TAG_BYTES))
        for i, (start, stop) in enumerate(chunk_ranges(payload_bytes))
    ]


def sealed_size(header_bytes: int, payload_bytes: int) -> int:
    """Bytes of a sealed message: header, payload, and one tag per chunk."""
    return header_bytes + payload_bytes + TAG_BYTES * len(chunk_ranges(payload_bytes))
