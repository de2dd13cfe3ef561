"""Sealing a large crossing: one thread vs several, and where the time goes.

    python benchmarks/seal_threads.py                 # a 7B crossing: 8 x 512 x 4096 bf16 (33.5 MB)
    python benchmarks/seal_threads.py --shape 16 64 256 --reps 50

A payload above ``CHUNK_BYTES`` (4 MiB) is sealed as AES-GCM chunks on this process's torch
threads (flglm.crypto.parallel). Measured side by side, in this one process:

- ``link``: ``SealedChannel.seal`` and ``open`` as the link runs them (a fresh message buffer
  each time), with 1 thread and with every core;
- ``aes``: AES-256-GCM of the same chunks alone, into buffers already in memory (what remains when
  the buffers come from a cache: pinned memory on a GPU side), 1 thread and every core;
- ``page_faults``: allocating and first touching a buffer of the message's size.

The last line is one JSON object: ``link_speedup`` and ``aes_speedup`` (1 thread / every core).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch

from flglm.benchmarking import seal_open_ms


def _median_ms(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return round(statistics.median(times), 2)


def aes_ms(nbytes: int, *, threads: int, reps: int) -> float:
    """AES-256-GCM of a payload's chunks into warm buffers, on ``threads`` threads."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from flglm.crypto.chunks import chunk_layout, sealed_size
    from flglm.crypto.parallel import run_all

    aead = AESGCM(os.urandom(32))
    source = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).numpy()
    sink = torch.zeros(sealed_size(0, nbytes), dtype=torch.uint8).numpy()
    layout = chunk_layout(0, nbytes)

    def chunk(i: int) -> None:
        plain, sealed = layout[i]
        aead.encrypt_into(i.to_bytes(12, "big"), source[plain], b"", sink[sealed])

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _median_ms(lambda: run_all([functools.partial(chunk, i) for i in range(len(layout))]), reps)
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[8, 512, 4096], help="the bf16 tensor that crosses (default: a 7B crossing)")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    nbytes = 2 * int(torch.tensor(shape).prod())
    cores = os.cpu_count() or 1
    print(f"payload {list(shape)} bf16 = {nbytes / 1e6:.1f} MB; this machine has {cores} cores", flush=True)
    rows = {}
    for threads in sorted({1, cores}):
        link = seal_open_ms(shape, threads=threads, reps=args.reps)
        rows[threads] = {**link, "aes_ms": aes_ms(nbytes, threads=threads, reps=args.reps)}
        print(f"{threads:>2} thread(s): seal {link['seal_ms']:7.2f} ms  open {link['open_ms']:7.2f} ms  "
              f"AES-GCM alone (warm buffers) {rows[threads]['aes_ms']:7.2f} ms", flush=True)  # fmt: skip
    faults = _median_ms(lambda: torch.empty(nbytes, dtype=torch.uint8).fill_(0), args.reps)
    print(f"a fresh {nbytes / 1e6:.1f} MB buffer, allocated and touched: {faults:.2f} ms (page faults)", flush=True)
    one, many = rows[1], rows[max(rows)]
    result = {
        "payload_mb": round(nbytes / 1e6, 1),
        "cores": cores,
        "seal_ms_1": one["seal_ms"],
        "open_ms_1": one["open_ms"],
        f"seal_ms_{cores}": many["seal_ms"],
        f"open_ms_{cores}": many["open_ms"],
        "aes_ms_1": one["aes_ms"],
        f"aes_ms_{cores}": many["aes_ms"],
        "page_faults_ms": faults,
        "link_speedup": round((one["seal_ms"] + one["open_ms"]) / (many["seal_ms"] + many["open_ms"]), 3),
        "aes_speedup": round(one["aes_ms"] / many["aes_ms"], 3),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
