"""``link.wire_dtype`` on the link, in one process: narrower hidden states and gradients train
and decode close to the float32 wire, sealed as before, over LocalTransport and a real socket;
summary's ``link`` section shows the bytes shrink by the encoding's factor; malformed parts are
refused with a message naming them; one real (torchrun'd) int8 federation's summary.json. (Real
RPC against the whole model: tests/test_rpc_split.py; float32 unchanged: every other suite, which
runs the default.)"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from test_encrypted_link import LIMIT, _client_session, _sessions
from test_federation import write_config

from flglm.client.lm import SplitCausalLM
from flglm.client.remote import RemoteMiddle
from flglm.client.server_link import ServerLink
from flglm.config import RunConfig, fingerprint
from flglm.crypto.keyring import generate_key_set
from flglm.jobs.subprocesses import run_federation
from flglm.link.crossing import Crossing
from flglm.link.messages import InvalidMessageError
from flglm.link.protocol import autocast_code
from flglm.link.socket_transport import SocketTransport
from flglm.link.wire_precision import BLOCK
from flglm.models import ClientBlocks
from flglm.models.split import plan_for
from flglm.optim import build_optimizer
from flglm.server.edge import Edge
from flglm.server.endpoint import ServerEndpoint
from flglm.server.middle_server import MiddleServer

BATCH, LENGTH, STEPS = 4, 16, 6


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    generate_key_set(tmp_path / "keys", num_clients=2)
    return tmp_path / "keys"


@dataclass
class Run:
    losses: list[float]
    link: dict[str, Any]
    """The endpoint's summary: summary.json's ``link`` section."""
    client: ServerLink


def _federation(cfg: RunConfig, keys: Path, *, socket: bool = False) -> tuple[ServerLink, SplitCausalLM, Callable[[], dict[str, Any]], Callable[[], None]]:
    """A 1-client encrypted federation in this process: (link, model, summary, close)."""
    server = MiddleServer(cfg)
    endpoint = ServerEndpoint(server, _sessions(keys))
    close: Callable[[], None] = server.close
    transport: Any = endpoint
    if socket:
        edge = Edge(
            endpoint, host="127.0.0.1", port=0, encrypted=True, max_frame_bytes=LIMIT * 2, first_frame_timeout_s=5,
            call_timeout_s=30, max_connections=4, max_connections_per_client=2,
        )  # fmt: skip
        edge.start()
        transport = SocketTransport(*edge.address, timeout_s=30, max_frame_bytes=LIMIT * 2)

        def close() -> None:
            transport.close()
            edge.close(wait_s=1)
            server.close()

    link = ServerLink(transport, client_id=0, timeout_s=30, session=_client_session(keys), wire_dtype=cfg.link.wire_dtype)
    info = link.hello(fingerprint(cfg), "tok")
    lm = SplitCausalLM(ClientBlocks(cfg.model, plan_for(cfg.model, cfg.split)), RemoteMiddle(link, server_info=info))
    return link, lm, endpoint.summary, close


def _train(cfg: RunConfig, keys: Path, *, socket: bool = False) -> Run:
    link, lm, summary, close = _federation(cfg, keys, socket=socket)
    optimizer = build_optimizer([p for p in lm.parameters() if p.requires_grad], cfg.optim)
    gen = torch.Generator().manual_seed(0)
    losses = []
    try:
        for step in range(STEPS):
            ids = torch.randint(3, 128, (BATCH, LENGTH), generator=gen)
            mask = torch.ones_like(ids)
            mask[1, 12:] = 0
            loss = torch.nn.functional.cross_entropy(lm(ids, mask).flatten(0, 1), ids.roll(-1, 1).flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            link.step(client_step=step, total_steps=STEPS)
            losses.append(loss.item())
        return Run(losses, summary(), link)
    finally:
        close()


def _wire(make: Callable[..., RunConfig], model: dict[str, Any], wire_dtype: str) -> RunConfig:
    return make(model, "federation.num_clients=2", "crypto.enabled=true", f"link.wire_dtype={wire_dtype}")


def test_narrower_wires_train_close_to_float32_and_their_crossings_shrink_by_the_encodings_factor(
    tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig], keys: Path
) -> None:
    # Prepare: a tiny llama, AdamW; each crossing holds n = batch x length x hidden elements
    model = tiny_model_configs["llama"]
    n = BATCH * LENGTH * model["hidden_size"]
    factor = {
        "bfloat16": (2 * n + 8) / (4 * n),  # 2 bytes a value, and the 8-byte source dtype code
        "int8": (n + 4 * math.ceil(n / BLOCK) + 8) / (4 * n),  # 1 byte a value, a float32 scale per 64
    }

    # Execute: the same steps over the float32 wire and the narrower ones (sealed, as always)
    exact = _train(_wire(make_run_config, model, "float32"), keys)
    runs = {wire_dtype: _train(_wire(make_run_config, model, wire_dtype), keys) for wire_dtype in factor}

    # Assert
    assert exact.link["wire_dtype"] == "float32"
    assert exact.link["crossing_bytes_in"] == exact.link["crossing_exact_bytes_in"] == 2 * STEPS * n * 4  # hidden + grad
    assert exact.link["crossing_bytes_out"] == exact.link["crossing_exact_bytes_out"] == 2 * STEPS * n * 4  # output + grad
    for wire_dtype, run in runs.items():
        link = run.link
        assert link["wire_dtype"] == wire_dtype and link["rejected_messages"] == 0
        # what each side sent at its own precision is what the float32 wire sent
        assert link["crossing_exact_bytes_in"] == exact.link["crossing_bytes_in"]
        assert link["crossing_exact_bytes_out"] == exact.link["crossing_bytes_out"]
        assert link["crossing_bytes_in"] / exact.link["crossing_bytes_in"] == pytest.approx(factor[wire_dtype], abs=1e-12)
        assert link["crossing_bytes_out"] / exact.link["crossing_bytes_out"] == pytest.approx(factor[wire_dtype], abs=1e-12)
        # the client counts the same crossings the other way round
        assert (run.client.codec.sent_bytes, run.client.codec.received_bytes) == (link["crossing_bytes_in"], link["crossing_bytes_out"])
        # the sealed messages shrink with them: crossings are most of this link's bytes
        assert link["wire_bytes_in"] < exact.link["wire_bytes_in"] * (factor[wire_dtype] + 0.1)
        assert link["wire_bytes_out"] < exact.link["wire_bytes_out"] * (factor[wire_dtype] + 0.1)
        # Losses: measured at most 2e-4 (bf16) and 8e-4 (int8) from float32's over these steps
        # (< 2e-4 relative to a loss of ~4.8): the tolerance leaves 6x room or more. Not equal: the wire did narrow.
        assert run.losses == pytest.approx(exact.losses, abs=5e-3)
        assert run.losses != exact.losses


def test_the_socket_link_carries_the_int8_wire_exactly_as_the_in_process_link(
    tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig], keys: Path
) -> None:
    # Prepare
    cfg = _wire(make_run_config, tiny_model_configs["llama"], "int8")

    # Execute: the same int8 run over the edge (real socket frames, sealed) and in process
    over_socket, local = _train(cfg, keys, socket=True), _train(cfg, keys)

    # Assert: the transport changes nothing: quantisation is deterministic
    assert over_socket.losses == local.losses
    assert over_socket.link["crossing_bytes_in"] == local.link["crossing_bytes_in"]


def test_generation_over_a_narrower_wire_stays_close_to_float32(
    tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig], keys: Path
) -> None:
    # Prepare: a prompt and three more tokens, fed the same way to both (teacher-forced: every step compares)
    model = tiny_model_configs["llama"]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 8), generator=gen)
    steps = torch.randint(3, 128, (2, 3), generator=gen)

    def decode(wire_dtype: str) -> tuple[list[torch.Tensor], dict[str, Any]]:
        _, lm, summary, close = _federation(_wire(make_run_config, model, wire_dtype), keys)
        try:
            with torch.no_grad():
                state = lm.open_decoding()
                mask = torch.ones_like(ids)
                logits = [lm.decode(state, ids, mask, torch.arange(8).expand(2, 8))[:, -1]]
                for k in range(steps.shape[1]):
                    mask = torch.ones(2, 9 + k, dtype=torch.int64)
                    logits.append(lm.decode(state, steps[:, k : k + 1], mask, torch.full((2, 1), 8 + k))[:, -1])
                lm.close_decoding(state)
            return logits, summary()
        finally:
            close()

    # Execute
    exact, exact_link = decode("float32")
    narrow, narrow_link = decode("int8")

    # Assert: measured 3.9e-3 on logits of magnitude <= 0.5 (5x room); the crossings shrank
    for a, b in zip(exact, narrow):
        torch.testing.assert_close(b, a, atol=2e-2, rtol=0)
    assert not all(torch.equal(a, b) for a, b in zip(exact, narrow))
    assert narrow_link["crossing_bytes_in"] < 0.3 * exact_link["crossing_bytes_in"]
    assert narrow_link["crossing_bytes_out"] < 0.3 * exact_link["crossing_bytes_out"]


def test_malformed_narrowed_parts_are_refused_with_a_message_naming_them(
    tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    # Prepare: the clear link (the endpoint's checks are the same sealed), an int8 wire
    cfg = make_run_config(tiny_model_configs["llama"], "link.wire_dtype=int8")
    server = MiddleServer(cfg)
    link = ServerLink(ServerEndpoint(server), client_id=0, timeout_s=30, wire_dtype="int8")
    link.hello(fingerprint(cfg), "tok")
    hidden = torch.randn(2, 4, 64)
    good = link.codec.pack(hidden)
    rest = [torch.ones(2, 4, dtype=torch.int64), torch.arange(4).unsqueeze(0), autocast_code("")]
    bad = {
        "values of another dtype": ([good[0].to(torch.int32), *good[1:]], "must be torch.int8 on a int8 wire"),
        "too few scales": ([good[0], good[1][:-1], good[2]], "need 8 float32 block scales"),
        "negative scales": ([good[0], -good[1], good[2]], "finite and >= 0"),
        "unknown source dtype": ([*good[:2], torch.tensor([7])], "source dtype must be an int64"),
        "exact values with scales": ([hidden, good[1], good[2]], "only int8 values have"),
        "float32 layout": ([hidden], "carries 6 tensors"),
    }

    # Execute / Assert: each refused, naming the part; then a good message still goes through
    for what, (parts, message) in bad.items():
        with pytest.raises(InvalidMessageError, match=message):
            link.exchange("infer", [*parts, *rest], step=1)
        assert server.stats.forwards == 0, what
    out = link.infer(Crossing(hidden, rest[0], rest[1]))
    assert out.shape == hidden.shape and out.dtype == torch.float32
    server.close()


def test_a_non_finite_tensor_crosses_exact_so_the_servers_nonfinite_policy_applies(
    tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    # Prepare: server.nonfinite=skip answers NaN hidden states with zeros, as with the float32 wire
    cfg = make_run_config(tiny_model_configs["llama"], "link.wire_dtype=int8", "server.nonfinite=skip")
    server = MiddleServer(cfg)
    link = ServerLink(ServerEndpoint(server), client_id=0, timeout_s=30, wire_dtype="int8")
    link.hello(fingerprint(cfg), "tok")
    hidden = torch.randn(2, 4, 64)
    hidden[1, 2, 3] = float("nan")

    # Execute
    parts = link.codec.pack(hidden)
    out = link.infer(Crossing(hidden, torch.ones(2, 4, dtype=torch.int64), torch.arange(4).unsqueeze(0)))

    # Assert: sent as float32 (no scales), skipped by the server, answered with zeros
    assert parts[0].dtype == torch.float32 and parts[1].numel() == 0
    assert torch.equal(out, torch.zeros(2, 4, 64)) and server.stats.skipped_nonfinite == 1
    server.close()


@pytest.mark.multiprocess
def test_a_real_int8_federation_reports_its_crossings_in_summary_json(tmp_path: Path) -> None:
    """torchrun'd server and client: both take link.wire_dtype from the config (else the fingerprint or the parts refuse)."""
    # Prepare: 4 steps of batch 8 x 32 on the tiny GLM (hidden 32)
    config = write_config(tmp_path, data={"max_train_rows": 32}, trainer={"max_steps": 4, "gradient_clip_val": None})
    run_dir = tmp_path / "run"

    # Execute
    run_federation(config, ["link.wire_dtype=int8", "server.num_threads=1"], num_clients=1, run_dir=run_dir, timeout_s=240)

    # Assert: every crossing at ~0.27 of its exact bytes, both ways; training went on
    link = json.loads((run_dir / "summary.json").read_text())["link"]
    assert link["wire_dtype"] == "int8" and link["crossing_exact_bytes_in"] > 0 and link["crossing_exact_bytes_out"] > 0
    assert 0.25 < link["crossing_bytes_in"] / link["crossing_exact_bytes_in"] <= 0.27
    assert 0.25 < link["crossing_bytes_out"] / link["crossing_exact_bytes_out"] <= 0.27
    losses = json.loads((run_dir / "client0" / "metrics.json").read_text())["losses"]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
