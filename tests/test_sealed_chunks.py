"""Large sealed messages: AES-GCM chunks sealed and opened on several threads (flglm.crypto.channel).

The chunk size is shrunk here (``CHUNK_BYTES``, ``MAX_CHUNKS``) so that messages of a few KB
have many chunks; the layout rules are the same at the real sizes (``test_real_layout``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flglm.crypto import MalformedError, MessageHeader, SealedChannel, TamperError
from flglm.crypto import channel as channel_module
from flglm.crypto import chunks as chunks_module
from flglm.crypto.chunks import TAG_BYTES, chunk_ranges, sealed_size
from flglm.crypto.parallel import run_all
from flglm.devices import to_compute, to_link

MAX = 1 << 24
KEYS = (os.urandom(32), os.urandom(32), os.urandom(16))


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(chunks_module, "CHUNK_BYTES", 256)
    monkeypatch.setattr(chunks_module, "MAX_CHUNKS", 8)
    monkeypatch.setattr(channel_module, "MAX_CHUNKS", 8)  # the channel's bound on a sealed message's size
    yield


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _pair() -> tuple[SealedChannel, SealedChannel]:
    c2s, s2c, sid = KEYS
    return SealedChannel(c2s, s2c, sid, direction="c2s"), SealedChannel(s2c, c2s, sid, direction="s2c")


def _header() -> MessageHeader:
    return MessageHeader(client_id=1, kind="forward", step=5)


def _payload(nbytes: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(nbytes)
    return [torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g), torch.randn(3, 4, generator=g).to(torch.bfloat16)]


def test_real_layout() -> None:
    """Up to 4 MiB one chunk (the format of every message the CPU examples send); a 7B crossing
    (8 x 512 x 4096 bf16) in 4 MiB chunks; never more than 256 chunks."""
    assert chunk_ranges(0) == [(0, 0)] and chunk_ranges(4 * 2**20) == [(0, 4 * 2**20)]
    crossing = 8 * 512 * 4096 * 2
    ranges = chunk_ranges(crossing)
    assert len(ranges) == 8 and all(stop - start == 4 * 2**20 for start, stop in ranges)
    huge = chunk_ranges(10 * 2**30)
    assert len(huge) <= 256 and huge[-1][1] == 10 * 2**30
    assert sealed_size(20, crossing) == 20 + crossing + 8 * TAG_BYTES


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # fixtures set constants
@given(nbytes=st.one_of(st.integers(0, 3000), st.sampled_from([255, 256, 257, 512, 513, 2048, 2049])), width=st.integers(1, 4))
def test_round_trip_across_chunk_edges(small_chunks: None, threads: None, nbytes: int, width: int) -> None:
    torch.set_num_threads(width)
    client, server = _pair()
    tensors = _payload(nbytes)
    sealed = client.seal(_header(), tensors)
    payload = nbytes + 24  # the bf16 tensor's 12 values
    assert 0 < sealed.numel() - payload - TAG_BYTES * len(chunk_ranges(payload)) < 64  # a header and one tag per chunk
    header, opened = server.open(sealed, expect_kind="forward", max_bytes=MAX)
    assert header.step == 5 and all(torch.equal(a, b) for a, b in zip(tensors, opened))


def test_ciphertext_does_not_depend_on_the_thread_count(small_chunks: None, threads: None) -> None:
    """Both ends agree whatever thread counts they run: the layout is the size's alone."""
    sealed = {}
    for width in (1, 2, 3):
        torch.set_num_threads(width)
        client, _ = _pair()
        sealed[width] = client.seal(_header(), _payload(2000))
    assert torch.equal(sealed[1], sealed[2]) and torch.equal(sealed[1], sealed[3])
    torch.set_num_threads(3)
    _, server = _pair()
    _, opened = server.open(sealed[1], expect_kind="forward", max_bytes=MAX)
    assert torch.equal(opened[0], _payload(2000)[0])


def _chunk_spans(sealed: torch.Tensor, payload: int) -> list[tuple[int, int]]:
    header = sealed.numel() - sealed_size(0, payload)
    return [(header + start + i * TAG_BYTES, header + stop + (i + 1) * TAG_BYTES) for i, (start, stop) in enumerate(chunk_ranges(payload))]


def test_each_chunk_is_authenticated_and_a_rejection_changes_nothing(small_chunks: None, threads: None) -> None:
    torch.set_num_threads(2)
    client, server = _pair()
    payload = _payload(1500)
    sealed = client.seal(_header(), payload)
    spans = _chunk_spans(sealed, 1500 + 24)
    assert len(spans) == 6
    for start, stop in spans:
        for at in (start, stop - 1):  # a ciphertext byte and a tag byte of every chunk
            bad = sealed.clone()
            bad[at] ^= 1
            with pytest.raises(TamperError):
                server.open(bad, expect_kind="forward", max_bytes=MAX)
    _, opened = server.open(sealed, expect_kind="forward", max_bytes=MAX)  # the channel is as it was
    assert torch.equal(opened[0], payload[0])


def test_chunks_cannot_be_swapped_dropped_or_replayed_into_another_message(small_chunks: None) -> None:
    client, server = _pair()
    sealed = client.seal(_header(), _payload(1500))
    (a0, a1), (b0, b1) = _chunk_spans(sealed, 1524)[:2]
    swapped = sealed.clone()
    swapped[a0:a1], swapped[b0:b1] = sealed[b0:b1], sealed[a0:a1]
    with pytest.raises(TamperError):
        server.open(swapped, expect_kind="forward", max_bytes=MAX)
    last = _chunk_spans(sealed, 1524)[-1]
    with pytest.raises(MalformedError, match="expected"):
        server.open(sealed[: last[0]].clone(), expect_kind="forward", max_bytes=MAX)
    second = client.seal(_header(), _payload(1500))  # same sizes, next counter
    spliced = second.clone()
    spliced[a0:a1] = sealed[a0:a1]
    _, opened = server.open(sealed, expect_kind="forward", max_bytes=MAX)
    with pytest.raises(TamperError):
        server.open(spliced, expect_kind="forward", max_bytes=MAX)
    _, again = server.open(second, expect_kind="forward", max_bytes=MAX)
    assert torch.equal(opened[0], again[0])


def test_run_all_waits_for_every_job_and_raises_the_first_error(threads: None) -> None:
    torch.set_num_threads(3)
    done: list[int] = []

    def job(i: int) -> None:
        done.append(i)
        if i in (1, 3):
            raise ValueError(f"job {i}")

    with pytest.raises(ValueError, match="job 1"):
        run_all([lambda i=i: job(i) for i in range(6)])
    assert sorted(done) == list(range(6))


def test_host_staging_is_a_no_op_on_the_cpu() -> None:
    t = torch.randn(2, 3, requires_grad=True)
    assert to_link(t) is t and to_compute(t, torch.device("cpu")) is t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host memory); benchmarks/gpu.py runs the link on a GPU")
def test_pinned_messages_and_staging_on_a_gpu() -> None:
    client, server = _pair()
    hidden = torch.randn(4, 8, 16, device="cuda", requires_grad=True)
    host = to_link(hidden)
    assert host.is_pinned() and torch.equal(host.detach(), hidden.detach().cpu())
    host.sum().backward()  # differentiable like .to("cpu")
    assert torch.equal(hidden.grad, torch.ones_like(hidden))
    sealed = client.seal(_header(), [host.detach()], pin_memory=True)
    _, (opened,) = server.open(sealed, expect_kind="forward", max_bytes=MAX, pin_memory=True)
    assert sealed.is_pinned() and opened.is_pinned()
    assert torch.equal(to_compute(opened, torch.device("cuda")), hidden.detach())
