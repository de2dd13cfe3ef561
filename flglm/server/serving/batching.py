"""Client-batching: the server runs a group of clients' requests as one batch.

Sequential serving gives one client's whole step the middle stack; client-batching gathers
the forward requests of up to ``server.max_clients_per_batch`` clients that arrive within
``server.batch_window_ms``, pads them to a common length (the padding is masked out and sits
after each row's real tokens, so a causal model's outputs for the real tokens do not change),
runs the middle once on the concatenated batch and returns each client its rows. The
matching backward requests are gathered the same way and run as one backward, and the
server's optimizer steps once per group, when every member has asked for its step.

The group's loss is the sample-weighted mean of its members' losses, as for one larger
batch: member ``i``'s output gradient is scaled by ``B_i / sum(B)`` before the shared
backward, and its input gradient is scaled back before it is returned, so each client still
receives exactly the gradient of its own loss.

With P-tuning v2 each client sends its own prefixes for the middle blocks: row ``r`` of the
gathered batch attends to the prefixes of the client it belongs to (one leaf tensor per
client, expanded over its rows), so each client's prefix gradient comes back from its own
rows only, scaled back like its input gradient.

Every call returns a future: no RPC thread waits while a group fills. A member that does not
send its next request within ``server.request_timeout_s`` (or leaves) is dropped from the
group and the others go on without it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.futures import Future

from flglm.devices import to_compute, to_link
from flglm.link.crossing import Crossing
from flglm.link.messages import InvalidMessageError, RequestHeader, check_gradient, wire
from flglm.server.middle import MiddleCompute

log = logging.getLogger("flglm.server")


@dataclass
class _Forward:
    header: RequestHeader
    crossing: Crossing
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)

    @property
    def hidden(self) -> torch.Tensor:
        return self.crossing.hidden

    @property
    def prefix(self) -> torch.Tensor | None:
        return self.crossing.prefix


@dataclass
class _Step:
    client_step: int
    total_steps: int
    grad_scale: float
    clip_value: float | None
    future: Future = field(default_factory=Future)


@dataclass
class _Graph:
    """The autograd state of one gathered forward, kept until its gathered backward."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    rows: dict[int, slice]
    lengths: dict[int, int]
    requests: dict[int, int]
    scales: dict[int, float]
    prefixes: dict[int, torch.Tensor] = field(default_factory=dict)
    """P-tuning v2: each member's prefixes (a leaf whose gradient is that member's alone)."""


@dataclass
class _Group:
    members: list[int]
    phase: str = "forward"
    """``forward`` (gathering a micro-batch), ``running``, ``backward`` (gathering gradients),
    ``after_backward`` (gathering the next micro-batch or the steps)."""
    forwards: dict[int, _Forward] = field(default_factory=dict)
    backwards: dict[int, tuple[torch.Tensor, Future]] = field(default_factory=dict)
    steps: dict[int, _Step] = field(default_factory=dict)
    graph: _Graph | None = None
    dropped: set[int] = field(default_factory=set)
    deadline: float = 0.0

    @property
    def live(self) -> list[int]:
        return [m for m in self.members if m not in self.dropped]


class ClientBatcher:
    """Gathers clients into groups; one group at a time uses the middle stack (a :class:`~flglm.server.serving.Serving`).

    Args:
        compute: the middle stack's compute core.
        clients: the clients a group may wait for.
        max_clients, window_s, timeout_s: ``server.max_clients_per_batch``, ``batch_window_ms`` (in s), ``request_timeout_s``.
    """

    def __init__(self, compute: MiddleCompute, *, clients: Sequence[int], max_clients: int, window_s: float, timeout_s: float) -> None:
        self._compute = compute
        self._clients = list(clients)
        self._max_clients = max_clients
        self._window_s = window_s
        self._timeout_s = timeout_s
        self._lock = threading.RLock()
        self._group: _Group | None = None
        self._forming: list[_Forward] = []
        self._left: set[int] = set()
        self._free_since = 0.0
        self.groups_run = 0
        self.group_sizes: list[int] = []
        self.dropped_members = 0
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="flglm-batching-timer", daemon=True)
        self._ticker.start()

    def close(self) -> None:
        self._stop.set()

    def stats(self) -> dict[str, Any]:
        sizes = self.group_sizes
        return {
            "groups": self.groups_run,
            "mean_group_size": round(sum(sizes) / len(sizes), 3) if sizes else 0.0,
            "dropped_members": self.dropped_members,
        }

    # ------------------------------------------------------------------- requests
    def forward(self, header: RequestHeader, crossing: Crossing) -> Future:
        request = _Forward(header, crossing)
        with self._lock:
            group = self._group
            cid = header.client_id
            if group is not None and cid in group.live:
                if group.phase not in ("forward", "after_backward") or cid in group.forwards or cid in group.steps:
                    raise InvalidMessageError(f"{header.describe()}: a forward arrived while the group expects a {group.phase} request")
                if group.phase == "after_backward":
                    group.phase, group.deadline = "forward", time.monotonic() + self._timeout_s
                group.forwards[cid] = request
                self._maybe_run_forward()
            else:
                if any(f.header.client_id == cid for f in self._forming):
                    raise InvalidMessageError(f"{header.describe()}: this client already waits for a group")
                self._forming.append(request)
                self._maybe_launch()
        return request.future

    def backward(self, header: RequestHeader, grad: torch.Tensor) -> Future:
        future: Future = Future()
        with self._lock:
            group = self._group
            cid = header.client_id
            if group is None or cid not in group.live or group.graph is None or group.phase != "backward":
                raise InvalidMessageError(f"{header.describe()}: no pending forward (never sent, already backpropagated, dropped, or timed out)")
            if group.graph.requests[cid] != header.request_id:
                raise InvalidMessageError(f"{header.describe()}: the pending forward of this client is request {group.graph.requests[cid]}")
            if cid in group.backwards:
                raise InvalidMessageError(f"{header.describe()}: a backward for this request already arrived")
            check_gradient(header, grad, group.graph.outputs[group.graph.rows[cid], : group.graph.lengths[cid]])
            group.backwards[cid] = (grad, future)
            self._maybe_run_backward()
        return future

    def step(self, client_id: int, client_step: int, total_steps: int, grad_scale: float, clip_value: float | None) -> Future:
        request = _Step(client_step, total_steps, grad_scale, clip_value)
        with self._lock:
            group = self._group
            if group is None or client_id not in group.live or group.phase != "after_backward" or client_id in group.steps:
                raise InvalidMessageError(f"client {client_id}: a step without a backward in the current group")
            group.steps[client_id] = request
            self._maybe_run_step()
        return request.future

    def join(self, client_id: int) -> None:
        """A client (re)joined: groups wait for it again."""
        with self._lock:
            self._left.discard(client_id)

    def leave(self, client_id: int) -> None:
        with self._lock:
            self._left.add(client_id)
            self._forming = [f for f in self._forming if f.header.client_id != client_id]
            self._drop(client_id, "left the federation")
            self._maybe_launch()

    # ---------------------------------------------------------------- the group
    def _active_count(self) -> int:
        """Clients a group waits for (up to the window): every expected client that has not left."""
        return max(1, len(self._clients) - len(self._left))

    def _maybe_launch(self) -> None:
        if self._group is not None or not self._forming:
            return
        wanted = min(self._max_clients, self._active_count())
        # The window runs from when a group could start: requests queued behind a running group
        # have not been waiting for company (measured: counting that time made every group of a
        # 2-client federation start alone, the clients then taking turns).
        waited = time.monotonic() - max(self._forming[0].arrived, self._free_since)
        if len(self._forming) < wanted and waited < self._window_s:
            return
        first, self._forming = self._forming[: self._max_clients], self._forming[self._max_clients :]
        first.sort(key=lambda f: f.header.client_id)  # rows in client order, not arrival order: reproducible sums
        group = _Group(members=[f.header.client_id for f in first])
        group.forwards = {f.header.client_id: f for f in first}
        self._group = group
        self.group_sizes.append(len(first))
        self._maybe_run_forward()

    def _maybe_run_forward(self) -> None:
        group = self._group
        assert group is not None
        if group.phase != "forward" or set(group.live) - set(group.forwards):
            return
        forwards = [group.forwards[m] for m in group.live]
        group.forwards = {}
        group.phase = "running"
        self._compute.submit(lambda: self._run_forward(group, forwards))

    def _maybe_run_backward(self) -> None:
        group = self._group
        assert group is not None and group.graph is not None
        if group.phase != "backward" or set(group.live) - set(group.backwards):
            return
        backwards = dict(group.backwards)
        group.backwards = {}
        group.phase = "running"
        self._compute.submit(lambda: self._run_backward(group, backwards))

    def _maybe_run_step(self) -> None:
        group = self._group
        assert group is not None
        if group.phase != "after_backward" or set(group.live) - set(group.steps):
            return
        steps = dict(group.steps)
        group.phase = "running"
        self._compute.submit(lambda: self._run_step(group, steps))

    def _drop(self, client_id: int, why: str) -> None:
        group = self._group
        if group is None or client_id not in group.live:
            return
        group.dropped.add(client_id)
        self.dropped_members += 1
        log.warning("client %d dropped from its batch group: %s", client_id, why)
        error = InvalidMessageError(f"client {client_id} was dropped from its batch group: {why}")
        for pending in (group.forwards.pop(client_id, None), group.steps.pop(client_id, None)):
            if pending is not None and not pending.future.done():
                pending.future.set_exception(error)
        if not group.live:
            self._compute.submit(lambda: self._finish(group, discard=True))
            return
        if group.phase == "forward":
            self._maybe_run_forward()
        elif group.phase == "backward":
            self._maybe_run_backward()
        elif group.phase == "after_backward":
            self._maybe_run_step()

    def _tick(self) -> None:
        """Closes batch windows and drops members that stopped answering."""
        while not self._stop.wait(min(0.01, self._window_s / 4 or 0.01)):
            with self._lock:
                group = self._group
                if group is not None and group.phase != "running" and group.deadline and time.monotonic() > group.deadline:
                    waiting = {"forward": group.forwards, "backward": group.backwards, "after_backward": group.steps}[group.phase]
                    for member in [m for m in group.live if m not in waiting]:
                        self._drop(
                            member, f"no {group.phase.replace('after_backward', 'step')} request within server.request_timeout_s={self._timeout_s}"
                        )
                self._maybe_launch()

    # ---------------------------------------------------------- compute thread
    def _run_forward(self, group: _Group, forwards: list[_Forward]) -> None:
        try:
            autocasts = {f.header.autocast for f in forwards}
            if len(autocasts) > 1:
                raise InvalidMessageError(f"clients of one batch group run different autocast settings {sorted(autocasts)}")
            length = max(f.hidden.shape[1] for f in forwards)
            hidden, mask, pos, rows, lengths = [], [], [], {}, {}
            start = 0
            device = self._compute.middle.device  # gathered, computed and split there
            for f in forwards:
                b, n, _ = f.hidden.shape
                pad = length - n
                hidden.append(torch.nn.functional.pad(to_compute(f.hidden, device), (0, 0, 0, pad)))
                mask.append(torch.nn.functional.pad(to_compute(f.crossing.attention_mask, device).to(torch.int64), (0, pad)))
                pos.append(torch.nn.functional.pad(to_compute(f.crossing.position_ids, device).expand(b, n), (0, pad)))
                rows[f.header.client_id] = slice(start, start + b)
                lengths[f.header.client_id] = n
                start += b
            total = float(start)
            inputs = torch.cat(hidden).detach().requires_grad_(True)
            prefixes = _member_prefixes(forwards)
            self._compute.middle.train()
            with torch.enable_grad():
                row_prefixes = _row_prefixes(forwards, prefixes) if prefixes else None
                gathered = Crossing(inputs, torch.cat(mask), torch.cat(pos))
                outputs = self._compute.gathered(forwards[0].header, gathered, row_prefixes=row_prefixes)
            graph = _Graph(
                inputs=inputs,
                outputs=outputs,
                rows=rows,
                lengths=lengths,
                requests={f.header.client_id: f.header.request_id for f in forwards},
                scales={cid: (r.stop - r.start) / total for cid, r in rows.items()},
                prefixes=prefixes,
            )
            with self._compute.lock:
                self._compute.stats.forwards += len(forwards)
        except BaseException as exc:  # noqa: BLE001 - every member learns why
            self._fail(group, [f.future for f in forwards], exc)
            return
        self._enter(group, "backward", graph=graph)
        for f in forwards:
            cid = f.header.client_id
            f.future.set_result(wire(to_link(outputs[rows[cid], : lengths[cid]].to(f.hidden.dtype))))
        with self._lock:
            if self._group is group:
                self._maybe_run_backward()

    def _run_backward(self, group: _Group, backwards: dict[int, tuple[torch.Tensor, Future]]) -> None:
        graph = group.graph
        assert graph is not None
        try:
            grad = torch.zeros_like(graph.outputs)
            for cid, (g, _) in backwards.items():
                grad[graph.rows[cid], : graph.lengths[cid]] = to_compute(g, grad.device).to(grad.dtype) * graph.scales[cid]
            graph.outputs.backward(grad)
            grad_in = graph.inputs.grad
            with self._compute.lock:
                self._compute.stats.backwards += len(backwards)
        except BaseException as exc:  # noqa: BLE001 - every member learns why
            self._fail(group, [f for _, f in backwards.values()], exc)
            return
        self._enter(group, "after_backward", graph=None)
        for cid, (g, future) in backwards.items():
            rows = wire(to_link((grad_in[graph.rows[cid], : graph.lengths[cid]] / graph.scales[cid]).to(g.dtype)))
            prefix = graph.prefixes.get(cid)
            if prefix is None:
                future.set_result(rows)
            else:
                grad_prefix = prefix.grad if prefix.grad is not None else torch.zeros_like(prefix)
                future.set_result((rows, wire(to_link(grad_prefix / graph.scales[cid]))))
        with self._lock:
            if self._group is group:
                self._maybe_run_step()

    def _run_step(self, group: _Group, steps: dict[int, _Step]) -> None:
        try:
            requests = list(steps.values())
            clips = [s.clip_value for s in requests if s.clip_value is not None]
            self._compute.step(
                max(s.client_step for s in requests),
                max(s.total_steps for s in requests),
                min(s.grad_scale for s in requests),
                min(clips) if clips else None,
            )
        except BaseException as exc:  # noqa: BLE001 - every member learns why
            self._fail(group, [r.future for r in requests], exc)
            return
        self.groups_run += 1
        with self._lock:  # the group is over before its members hear so: their next forward starts a new one
            self._finish_locked(group, discard=False)
        for s in requests:
            s.future.set_result(None)

    def _enter(self, group: _Group, phase: str, *, graph: _Graph | None) -> None:
        """The group's computation is done: wait (with a deadline) for its members' next requests."""
        with self._lock:
            group.graph = graph
            group.phase = phase
            group.deadline = time.monotonic() + self._timeout_s

    def _fail(self, group: _Group, futures: list[Future], exc: BaseException) -> None:
        """A computation failed: every waiting member gets the error and the group ends."""
        for future in futures:
            future.set_exception(exc)
        with self._lock:
            self._finish_locked(group, discard=True)

    def _finish(self, group: _Group, *, discard: bool) -> None:
        with self._lock:
            self._finish_locked(group, discard=discard)

    def _finish_locked(self, group: _Group, *, discard: bool) -> None:
        if self._group is not group:
            return
        if discard:
            self._compute.discard_grads()
        self._group = None
        self._free_since = time.monotonic()
        self._maybe_launch()


def _member_prefixes(forwards: list[_Forward]) -> dict[int, torch.Tensor]:
    """Each member's P-tuning prefixes as a leaf that collects its gradient. Every member of a
    group must send them or none; the checks on arrival fix every dimension but the prefix
    length, so the members' shapes are compared here."""
    sent = [f.prefix is not None for f in forwards]
    if not any(sent):
        return {}
    if not all(sent):
        missing = [f.header.client_id for f in forwards if f.prefix is None]
        raise InvalidMessageError(f"clients {missing} sent no P-tuning prefixes while others of their batch group did")
    shapes = {tuple(f.prefix.shape) for f in forwards if f.prefix is not None}
    if len(shapes) > 1:
        raise InvalidMessageError(f"the clients of one batch group sent prefixes of different shapes {sorted(shapes)}")
    return {f.header.client_id: f.prefix.detach().requires_grad_() for f in forwards if f.prefix is not None}


def _row_prefixes(forwards: list[_Forward], prefixes: dict[int, torch.Tensor]) -> torch.Tensor:
    """Every row's prefixes, in the gathered batch's row order: each member's own, repeated over its rows."""
    rows = []
    for f in forwards:
        prefix = prefixes[f.header.client_id]
        rows.append(prefix.unsqueeze(0).expand(f.hidden.shape[0], *prefix.shape))
    return torch.cat(rows)
