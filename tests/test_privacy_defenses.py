"""The privacy defenses (``privacy`` config): what the server receives is clipped and noised as
configured, private blocks stay out of FedAvg, secret initialisation is secret.

In one process: the client's model talks to a local ``MiddleServer`` through the real link code;
what crosses the link is recorded at the client's end of it (``ServerLink.forward``/``backward``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_split import _padded_batch, train_steps
from torch import nn

from flglm.aggregation.shared import excluded_names
from flglm.callbacks import FedAvgCallback
from flglm.client.lm import SplitCausalLM
from flglm.client.remote import RemoteMiddle
from flglm.client.server_link import ServerLink
from flglm.config import ConfigError, PrivacyConfig, RunConfig, fingerprint
from flglm.models import ClientBlocks
from flglm.models.split import plan_for
from flglm.privacy import PrivacyGuard, apply_secret_init, client_defenses, private_parameter_names, secret_generator
from flglm.privacy import defenses as defenses_mod
from flglm.server.endpoint import ServerEndpoint
from flglm.server.middle_server import MiddleServer

NOISE_TOLERANCE = 0.10
"""Measured noise-to-scale ratios must be within 10% of the configured multiplier."""


@pytest.fixture
def cfg(tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]) -> RunConfig:
    return make_run_config(tiny_model_configs["llama"])


def _blocks(cfg: RunConfig) -> ClientBlocks:
    return ClientBlocks(cfg.model, plan_for(cfg.model, cfg.split), cfg.peft)


def _lm(cfg: RunConfig, guard: PrivacyGuard | None = None, blocks: ClientBlocks | None = None) -> tuple[SplitCausalLM, MiddleServer]:
    server = MiddleServer(cfg)
    link = ServerLink(ServerEndpoint(server), client_id=0, timeout_s=30.0)
    info = link.hello(fingerprint(cfg), "tok")
    return SplitCausalLM(blocks or _blocks(cfg), RemoteMiddle(link, server_info=info), guard=guard), server


def _guard(hidden_size: int = 64, **privacy: Any) -> PrivacyGuard:
    guard = PrivacyGuard.from_config(PrivacyConfig(noise_seed=0, **privacy), client_index=0, hidden_size=hidden_size)
    assert guard is not None
    return guard


class _Recorder:
    """Wraps a link's ``forward``/``backward``: keeps copies of the hidden states and gradients sent."""

    def __init__(self, link: ServerLink) -> None:
        self.hidden: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        forward, backward = link.forward, link.backward

        def record_forward(header: Any, crossing: Any) -> torch.Tensor:
            self.hidden.append(crossing.hidden.detach().clone())
            return forward(header, crossing)

        def record_backward(header: Any, grad: torch.Tensor) -> Any:
            self.grads.append(grad.detach().clone())
            return backward(header, grad)

        link.forward, link.backward = record_forward, record_backward  # type: ignore[method-assign]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """8 full rows of 16 tokens: 128 token vectors to measure noise on."""
    ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    return ids, torch.ones_like(ids)


def _forward_backward(lm: SplitCausalLM) -> _Recorder:
    recorder = _Recorder(lm.link)
    ids, mask = _batch()
    logits = lm(ids, mask)
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits * weight).sum().backward()
    return recorder


def _ratio(noisy: torch.Tensor, clean: torch.Tensor, scale: torch.Tensor | float) -> float:
    """Mean over tokens of ||noisy - clean|| / scale."""
    return float((torch.linalg.vector_norm(noisy - clean, dim=-1) / scale).mean())


# --------------------------------------------------------------------------- all off


def test_all_off_makes_no_guard_and_changes_nothing(cfg: RunConfig) -> None:
    # Prepare
    blocks = _blocks(cfg)
    before = {n: p.detach().clone() for n, p in blocks.hf.named_parameters()}
    # Execute
    defenses = client_defenses(cfg.privacy, blocks, client_index=0)
    # Assert
    assert PrivacyGuard.from_config(cfg.privacy, client_index=0, hidden_size=64) is None
    assert defenses.guard is None and defenses.private_names == frozenset() and defenses.summary == "none"
    assert all(torch.equal(p, before[n]) for n, p in blocks.hf.named_parameters())
    lm, server = _lm(cfg, defenses.guard, blocks)
    sent = _forward_backward(lm).hidden[0]
    ids, mask = _batch()
    assert torch.equal(sent, blocks.input_block(ids, mask).hidden.detach())
    server.close()


# --------------------------------------------------------------------------- hidden states


def test_hidden_noise_has_the_configured_norm_relative_to_each_token(cfg: RunConfig) -> None:
    # Prepare
    lm, server = _lm(cfg, _guard(hidden_noise=0.5))
    ids, mask = _batch()
    clean = lm.blocks.input_block(ids, mask).hidden.detach()
    # Execute
    sent = _forward_backward(lm).hidden[0]
    # Assert
    ratio = _ratio(sent, clean, torch.linalg.vector_norm(clean, dim=-1))
    assert ratio == pytest.approx(0.5, rel=NOISE_TOLERANCE)
    server.close()


def test_hidden_clip_bounds_every_sent_token_and_noise_scales_with_the_bound(cfg: RunConfig) -> None:
    # Prepare: a bound below most tokens' norm, so clipping acts
    lm, server = _lm(cfg, _guard(hidden_clip=0.1))
    ids, mask = _batch()
    clean = lm.blocks.input_block(ids, mask).hidden.detach()
    assert (torch.linalg.vector_norm(clean, dim=-1) > 0.1).float().mean() > 0.5
    # Execute
    clipped = _forward_backward(lm).hidden[0]
    lm.guard = _guard(hidden_clip=0.1, hidden_noise=2.0)
    noisy = _forward_backward(lm).hidden[0]
    # Assert
    assert torch.linalg.vector_norm(clipped, dim=-1).max() <= 0.1 + 1e-6
    assert _ratio(noisy, clipped, 0.1) == pytest.approx(2.0, rel=NOISE_TOLERANCE)
    server.close()


def test_hidden_noise_passes_the_gradient_through_and_the_clip_has_its_jacobian() -> None:
    # Prepare
    x = torch.randn(4, 5, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = torch.randn(4, 5, 64, generator=torch.Generator().manual_seed(1))
    # Execute / Assert: noise only -> identity gradient
    (_guard(hidden_noise=1.0).hidden(x) * w).sum().backward()
    torch.testing.assert_close(x.grad, w)
    # clip (+ noise) -> the gradient of the clip alone
    x.grad = None
    (_guard(hidden_clip=1.0, hidden_noise=1.0).hidden(x) * w).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    norm = torch.linalg.vector_norm(reference, dim=-1, keepdim=True)
    (reference * (1.0 / norm).clamp(max=1.0) * w).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)


# --------------------------------------------------------------------------- gradients


def test_grad_noise_and_clip_change_the_gradient_the_server_receives(cfg: RunConfig) -> None:
    # Prepare: the clean gradient, with a guard that touches nothing the server gets
    lm, server = _lm(cfg)
    clean_run = _forward_backward(lm)
    clean = clean_run.grads[0]
    norms = torch.linalg.vector_norm(clean, dim=-1)
    # Execute
    lm.guard = _guard(grad_noise=0.5)
    noisy_run = _forward_backward(lm)
    bound = float(norms.median())
    lm.guard = _guard(grad_clip=bound)
    clipped = _forward_backward(lm).grads[0]
    # Assert: the forward is unchanged (identity), only the gradient is
    assert torch.equal(noisy_run.hidden[0], clean_run.hidden[0])
    assert _ratio(noisy_run.grads[0], clean, norms) == pytest.approx(0.5, rel=NOISE_TOLERANCE)
    assert torch.linalg.vector_norm(clipped, dim=-1).max() <= bound * (1 + 1e-5)
    assert not torch.equal(clipped, clean)
    server.close()


def test_grad_noise_with_a_clip_is_scaled_by_the_bound() -> None:
    # Prepare
    x = torch.randn(8, 16, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    g = torch.randn(8, 16, 64, generator=torch.Generator().manual_seed(1)) * 10
    guard = _guard(grad_clip=1.0, grad_noise=0.5)
    # Execute
    out = guard.gradient(x)
    out.backward(g)
    # Assert
    assert torch.equal(out, x)
    clipped = g / torch.linalg.vector_norm(g, dim=-1, keepdim=True)  # every token is longer than 1
    assert _ratio(x.grad, clipped, 1.0) == pytest.approx(0.5, rel=NOISE_TOLERANCE)


# --------------------------------------------------------------------------- noise seeds


def test_a_noise_seed_reproduces_the_noise_and_none_draws_a_secret_one(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.ones(4, 64)

    def noise(seed: int | None, client: int = 0) -> torch.Tensor:
        guard = PrivacyGuard.from_config(PrivacyConfig(hidden_noise=1.0, noise_seed=seed), client_index=client, hidden_size=64)
        assert guard is not None
        return guard.hidden(x)

    assert torch.equal(noise(7), noise(7))
    assert not torch.equal(noise(7, client=0), noise(7, client=1))
    assert torch.equal(noise(7, client=1), noise(8, client=0))  # client i uses noise_seed + i
    assert not torch.equal(noise(None), noise(None))
    # the whole generator state is secret, not just a (32-bit) seed
    monkeypatch.setattr(defenses_mod.secrets, "randbits", lambda bits: 12345)
    a, b = secret_generator(), secret_generator()
    assert not torch.equal(torch.randn(100, generator=a), torch.randn(100, generator=b))


# --------------------------------------------------------------------------- private blocks


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_private_parameter_names_cover_the_input_and_output_blocks(
    arch: str, tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    blocks = _blocks(make_run_config(tiny_model_configs[arch]))
    names = {n for n, _ in blocks.hf.named_parameters()}
    layers = "model.layers" if arch == "llama" else "transformer.h"
    embed = "model.embed_tokens.weight" if arch == "llama" else "transformer.wte.weight"
    norm = "model.norm." if arch == "llama" else "transformer.ln_f."

    inputs = private_parameter_names(blocks, ["input"])
    outputs = private_parameter_names(blocks, ["output"])

    assert embed in inputs and any(n.startswith(f"{layers}.0.") for n in inputs)
    assert not any(n.startswith(f"{layers}.3.") or n.startswith(norm) for n in inputs)
    assert any(n.startswith(f"{layers}.3.") for n in outputs) and any(n.startswith(norm) for n in outputs)
    assert not any(n.startswith(f"{layers}.0.") for n in outputs)
    if arch == "gpt2":  # tied LM head: the embedding's matrix is part of the output block too
        assert "transformer.wpe.weight" in inputs and embed in outputs
    else:
        assert "lm_head.weight" in outputs
    assert inputs | outputs == names == private_parameter_names(blocks, ["input", "output"])


class _AveragingLink:
    """Two clients' plain FedAvg: each ``aggregate`` waits for the other and gets the mean."""

    def __init__(self) -> None:
        self.vectors: dict[int, torch.Tensor] = {}
        self._barrier = threading.Barrier(2, timeout=30)

    def for_client(self, index: int) -> Any:
        def aggregate(round_index: int, vector: torch.Tensor, weight: float) -> torch.Tensor:
            self.vectors[index] = vector.clone()
            self._barrier.wait()
            return (self.vectors[0] + self.vectors[1]) / 2

        return SimpleNamespace(aggregate=aggregate)


def _module(blocks: ClientBlocks) -> Any:
    """What FedAvg reads of a task module: ``lm`` (its names are ``blocks.hf.<HF name>``) and a sample count."""
    lm = nn.Module()
    lm.blocks = blocks
    return SimpleNamespace(lm=lm, samples_seen=10)


def test_fedavg_leaves_private_blocks_out_and_averages_the_rest(cfg: RunConfig) -> None:
    # Prepare: two clients whose weights all differ
    clients = [_blocks(cfg), _blocks(cfg)]
    apply_secret_init(clients[1], ["input", "output"], seed=1)
    with torch.no_grad():
        for p in clients[1].hf.parameters():
            p.add_(0.5)
    private = private_parameter_names(clients[0], ["input"])
    before = [{n: p.detach().clone() for n, p in c.hf.named_parameters()} for c in clients]
    link = _AveragingLink()
    callbacks = [FedAvgCallback(link.for_client(i), exclude=private) for i in range(2)]
    trainer = SimpleNamespace(global_step=1)
    # Execute
    threads = [threading.Thread(target=callbacks[i].aggregate, args=(trainer, _module(clients[i]))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    # Assert
    shared = [p for n, p in clients[0].hf.named_parameters() if n not in private]
    assert link.vectors[0].numel() == sum(p.numel() for p in shared)
    for (name, a), (_, b) in zip(clients[0].hf.named_parameters(), clients[1].hf.named_parameters()):
        if name in private:
            assert torch.equal(a, before[0][name]) and torch.equal(b, before[1][name]), name
        else:
            assert torch.equal(a, b), name
            torch.testing.assert_close(a, (before[0][name] + before[1][name]) / 2, msg=name)


def test_exclude_names_must_match_one_parameter_each() -> None:
    names = ["blocks.hf.model.norm.weight", "blocks.hf.model.layers.0.input_layernorm.weight"]
    assert excluded_names(names, {"model.norm.weight"}) == {"blocks.hf.model.norm.weight"}
    assert excluded_names(names, {"blocks.hf.model.norm.weight"}) == {"blocks.hf.model.norm.weight"}
    with pytest.raises(ValueError, match="no parameter"):
        excluded_names(names, {"norm.bias"})
    with pytest.raises(ValueError, match="several"):
        excluded_names(names, {"weight"})
    with pytest.raises(TypeError, match="string"):
        FedAvgCallback(None, exclude="model.norm.weight")


def test_an_all_private_client_still_takes_part_in_rounds(
    tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    # every client parameter private: the upload is empty, the round still runs (the server's sync point)
    lm, server = _lm(make_run_config(tiny_model_configs["llama"], "crypto.enabled=false"))
    callback = FedAvgCallback(lm.link, exclude=private_parameter_names(lm.blocks, ["input", "output"]))
    before = {n: p.detach().clone() for n, p in lm.blocks.hf.named_parameters()}
    callback.aggregate(SimpleNamespace(global_step=1), SimpleNamespace(lm=lm, samples_seen=4))
    assert callback.rounds == 1
    assert all(torch.equal(p, before[n]) for n, p in lm.blocks.hf.named_parameters())
    server.close()


# --------------------------------------------------------------------------- secret init


def test_secret_init_redraws_only_the_private_blocks_unlike_the_public_weights(cfg: RunConfig) -> None:
    # Prepare
    public = dict(_blocks(cfg).hf.named_parameters())
    first, second = _blocks(cfg), _blocks(cfg)
    private = private_parameter_names(first, ["input"])
    # Execute
    apply_secret_init(first, ["input"])
    apply_secret_init(second, ["input"])
    # Assert
    std = cfg.model.config.get("initializer_range", 0.02)
    for (name, a), (_, b) in zip(first.hf.named_parameters(), second.hf.named_parameters()):
        if name not in private or "norm" in name:  # norms are constants of the distribution (1)
            assert torch.equal(a, public[name]) and torch.equal(b, public[name]), name
            continue
        assert not torch.equal(a, public[name]) and not torch.equal(a, b), name
        assert float(a.detach().std()) == pytest.approx(std, rel=0.1), name
    seeded = [_blocks(cfg), _blocks(cfg)]
    for blocks in seeded:
        apply_secret_init(blocks, ["output"], seed=5)
    assert all(torch.equal(a, b) for a, b in zip(seeded[0].hf.parameters(), seeded[1].hf.parameters()))


def test_all_defenses_on_train_through_the_split(tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]) -> None:
    cfg = make_run_config(
        tiny_model_configs["gpt2"],
        "privacy.hidden_clip=1.0",
        "privacy.hidden_noise=0.1",
        "privacy.grad_clip=0.01",
        "privacy.grad_noise=0.1",
        "privacy.private_blocks=[input,output]",
        "privacy.secret_init=true",
    )
    blocks = _blocks(cfg)
    defenses = client_defenses(cfg.privacy, blocks, client_index=0)
    assert defenses.guard is not None and defenses.private_names == private_parameter_names(blocks, ["input", "output"])
    assert "secret" in defenses.summary and "hidden noise 0.1" in defenses.summary
    lm, server = _lm(cfg, defenses.guard, blocks)
    before = {n: p.detach().clone() for n, p in blocks.hf.named_parameters()}
    train_steps(lm, steps=2, lr=1e-2)
    assert any(not torch.equal(p, before[n]) for n, p in blocks.hf.named_parameters())
    # decoding sends clipped hidden states too
    sent: list[torch.Tensor] = []
    decode = lm.link.decode
    lm.link.decode = lambda session, past, crossing: (sent.append(crossing.hidden.clone()), decode(session, past, crossing))[1]
    ids, mask = _padded_batch()
    state = lm.open_decoding()
    with torch.no_grad():
        lm.decode(state, ids, mask, torch.arange(ids.shape[1]).expand_as(ids))
    lm.close_decoding(state)
    assert torch.linalg.vector_norm(sent[0], dim=-1).max() <= 1.0 + 0.5  # bound + noise of norm about 0.1
    server.close()


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("privacy.hidden_noise=-0.1", "privacy.hidden_noise"),
        ("privacy.hidden_clip=nan", "privacy.hidden_clip"),
        ("privacy.grad_clip=-1", "privacy.grad_clip"),
        ("privacy.grad_noise=inf", "privacy.grad_noise"),
        ("privacy.private_blocks=[middle]", "privacy.private_blocks"),
        ("privacy.private_blocks=[input,input]", "privacy.private_blocks"),
        ("privacy.secret_init=true", "privacy.secret_init"),
        ("privacy.noise_seed=-1", "privacy.noise_seed"),
        ("privacy.hidden_nois=1", "privacy.hidden_nois"),
    ],
)
def test_bad_privacy_settings_are_config_errors_naming_the_key(
    override: str, key: str, tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    with pytest.raises(ConfigError, match=key):
        make_run_config(tiny_model_configs["llama"], override)


def test_secret_init_needs_trainable_base_weights(
    tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    with pytest.raises(ConfigError, match="privacy.secret_init needs peft.method=none"):
        make_run_config(tiny_model_configs["llama"], "privacy.private_blocks=[input]", "privacy.secret_init=true", "peft.method=lora")


def test_privacy_is_part_of_the_config_fingerprint(
    tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    plain = make_run_config(tiny_model_configs["llama"])
    private = make_run_config(tiny_model_configs["llama"], "privacy.private_blocks=[output]")
    assert fingerprint(plain) != fingerprint(private)


# --------------------------------------------------------------------------- a real federation


@pytest.mark.multiprocess
def test_a_federation_with_private_output_blocks_shares_only_the_rest(tmp_path: Any) -> None:
    from flglm.jobs.subprocesses import run_federation
    from flglm.tensor_files import load_tensors
    from tests.test_federation import write_config

    # Prepare: two clients, private (secretly re-drawn) output blocks, noise both ways, secure aggregation on
    privacy = {"private_blocks": ["output"], "secret_init": True, "hidden_noise": 0.1, "grad_clip": 1.0, "grad_noise": 0.1}
    config = write_config(tmp_path, privacy=privacy, trainer={"max_steps": 4}, federation={"aggregate_every": 2})
    run_dir = tmp_path / "fed"
    # Execute
    run_federation(config, num_clients=2, run_dir=run_dir, timeout_s=240)
    # Assert
    weights = [load_tensors(run_dir / f"client{i}" / "client_blocks.safetensors") for i in range(2)]
    output = {n for n in weights[0] if n.startswith(("model.layers.3.", "lm_head.")) and "norm" not in n}
    assert output and all(not torch.equal(weights[0][n], weights[1][n]) for n in output)
    shared = [n for n in weights[0] if n.startswith(("model.embed_tokens.", "model.layers.0."))]
    assert shared and all(torch.equal(weights[0][n], weights[1][n]) for n in shared)
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("client*.log"))
    assert "privacy defenses: hidden noise 0.1, grad clip 1, grad noise 0.1; private blocks ['output']" in logs
