"""Run the chunks of one sealed message on several threads.

``cryptography`` releases the GIL while AES-GCM runs, so threads, not processes, share a large
message (measured on a 2-core VM: two threads did the same cache-resident AES work in 0.81x the
time of one, but gained nothing on a 33.6 MB message, which is bound by memory and page faults;
benchmarks/seal_threads.py). The width is this process's torch thread count, which every process already sets to its
share of the machine's cores (``flglm.distributed.configure_threads``): sealing never oversubscribes
the cores that compute uses.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_width = 0


def crypto_threads() -> int:
    """How many threads seal one message: this process's torch thread count."""
    return max(1, torch.get_num_threads())


def _executor(width: int) -> ThreadPoolExecutor:
    global _pool, _pool_width
    with _lock:
        if _pool is None or _pool_width != width:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_width = ThreadPoolExecutor(max_workers=width, thread_name_prefix="flglm-crypto"), width
        return _pool


def run_all(jobs: Sequence[Callable[[], None]]) -> None:
    """Run every job (on up to :func:`crypto_threads` threads) and wait for all of them; then
    raise the first job's exception, if any. One job, or one thread, runs on the caller's thread."""
    width = min(len(jobs), crypto_threads())
    if width <= 1:
        for job in jobs:
            job()
        return
    pool = _executor(crypto_threads())
    futures = [pool.submit(job) for job in jobs]
    errors = [f.exception() for f in futures]  # waits for every job: none still writes a buffer after we return
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
