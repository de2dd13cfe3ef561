"""Tests for flglm.models: the split plan, what each side owns, and split == whole model.

The split runs in one process: the client blocks talk to a local ``MiddleServer`` through
``ServerLink``/``RemoteMiddle`` (no RPC), so forward and backward cross exactly the code paths
of a real run. The reference is the whole Hugging Face model with the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from flglm.client.lm import SplitCausalLM
from flglm.client.remote import RemoteMiddle
from flglm.client.server_link import ServerLink
from flglm.config import ModelConfig, RunConfig, fingerprint
from flglm.models import (
    ADAPTERS,
    ClientBlocks,
    MiddleStack,
    SplitError,
    UnsupportedModelError,
    build_full_model,
    load_hf_config,
    plan_split,
)
from flglm.models.split import build_skeleton
from flglm.server.endpoint import ServerEndpoint
from flglm.server.middle_server import MiddleServer

ARCHS = ("glm", "glm4", "llama", "qwen2", "mistral", "gpt2")
EXACT = {"atol": 1e-5, "rtol": 0.0}
FAST = settings(max_examples=200, deadline=None)


def _padded_batch(*, lengths: tuple[int, ...] = (10, 6, 3), vocab: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids (pad id 0) and their attention mask; rows of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], dtype=torch.long)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=gen).masked_fill(mask == 0, 0)
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return torch.arange(mask.shape[1]).expand_as(mask)


def _split_lm(cfg: RunConfig) -> tuple[SplitCausalLM, MiddleServer]:
    """The client's model over a local server built from the same config."""
    plan = plan_split(
        int(load_hf_config(cfg.model).num_hidden_layers),
        client_head_layers=cfg.split.client_head_layers,
        client_tail_layers=cfg.split.client_tail_layers,
    )
    server = MiddleServer(cfg)
    link = ServerLink(ServerEndpoint(server), client_id=0, timeout_s=30.0)
    info = link.hello(fingerprint(cfg), "test-tokenizer")
    return SplitCausalLM(ClientBlocks(cfg.model, plan, cfg.peft), RemoteMiddle(link, server_info=info)), server


def move_lora_adapters(lm: SplitCausalLM, server: MiddleServer, full: torch.nn.Module) -> None:
    """LoRA's B starts at zero: move every adapter B off it, identically in the split and the
    whole model, so the adapters matter to what is compared."""
    with torch.no_grad():
        full_params = dict(full.named_parameters())
        for name, param in [*lm.blocks.hf.named_parameters(), *server.middle.hf.named_parameters()]:
            if ".lora_B." in name:
                value = torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1
                param.copy_(value)
                full_params[name].copy_(value)


def train_steps(lm: SplitCausalLM, *, steps: int, lr: float) -> None:
    """Real training steps through the split (next-token loss on the padded batch, padding not a
    target): the client's AdamW on what trains, the server's step over the link after each."""
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=lr)
    ids, mask = _padded_batch()
    for step in range(steps):
        logits = lm(ids, mask)
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        lm.link.step(client_step=step, total_steps=steps)


def snapshot(sides: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of every parameter of each side, by side and name."""
    return {side: {n: p.detach().clone() for n, p in model.named_parameters()} for side, model in sides.items()}


def assert_base_unchanged(
    sides: dict[str, torch.nn.Module], before: dict[str, dict[str, torch.Tensor]], is_adapter: Callable[[str], bool]
) -> None:
    """Every parameter that is not an adapter is byte-identical to its snapshot, on every side."""
    for side, model in sides.items():
        for name, param in model.named_parameters():
            if not is_adapter(name):
                assert param.detach().numpy().tobytes() == before[side][name].numpy().tobytes(), (side, name)


def _run_both(lm: SplitCausalLM, full: torch.nn.Module) -> None:
    """One padded batch forward through split and whole model (logits must agree), then the same
    random-weighted loss backward through both."""
    ids, mask = _padded_batch()
    split_logits = lm(ids, mask)
    full_logits = full(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
    torch.testing.assert_close(split_logits, full_logits, **EXACT)

    weight = torch.randn(full_logits.shape, generator=torch.Generator().manual_seed(1)) * mask.unsqueeze(-1)
    (split_logits * weight).sum().backward()
    (full_logits * weight).sum().backward()


def _assert_split_matches_full(cfg: RunConfig) -> None:
    """Logits and every parameter's gradient of split and whole model agree on a padded batch."""
    lm, server = _split_lm(cfg)
    full = build_full_model(cfg.model)
    _run_both(lm, full)
    assert server.pending_count() == 0

    full_params = dict(full.named_parameters())
    split_params = [*lm.blocks.hf.named_parameters(), *server.middle.hf.named_parameters()]
    assert sorted(name for name, _ in split_params) == sorted(full_params)
    for name, param in split_params:
        assert param.grad is not None, f"{name} got no gradient through the split"
        torch.testing.assert_close(param.grad, full_params[name].grad, **EXACT, msg=lambda m, n=name: f"{n}: {m}")


def _layer_index(name: str, layers_path: str) -> int | None:
    prefix = f"{layers_path}."
    return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None


# --------------------------------------------------------------------------- plan_split


def test_plan_split_ranges() -> None:
    plan = plan_split(6, client_head_layers=2, client_tail_layers=1)

    assert (plan.head, plan.middle, plan.tail) == (range(2), range(2, 5), range(5, 6))
    assert plan.layers_of("client") == [0, 1, 5]
    assert plan.layers_of("server") == [2, 3, 4]
    assert plan.layers_of("full") == [0, 1, 2, 3, 4, 5]


def test_plan_split_may_keep_no_block_on_the_client() -> None:
    plan = plan_split(4, client_head_layers=0, client_tail_layers=0)

    assert (plan.head, plan.middle, plan.tail) == (range(0), range(4), range(4, 4))


@pytest.mark.parametrize(("layers", "head", "tail"), [(4, 2, 2), (4, 3, 2), (1, 1, 0), (1, 0, 1), (5, 0, 7)])
def test_plan_split_rejects_a_cut_that_leaves_the_server_nothing(layers: int, head: int, tail: int) -> None:
    with pytest.raises(SplitError) as err:
        plan_split(layers, client_head_layers=head, client_tail_layers=tail)

    message = str(err.value)
    assert f"{head} + {tail}" in message
    assert f"only {layers} blocks" in message


def test_plan_split_rejects_negative_counts() -> None:
    with pytest.raises(SplitError, match="-1"):
        plan_split(4, client_head_layers=-1, client_tail_layers=1)


@FAST
@given(layers=st.integers(1, 64), head=st.integers(0, 64), tail=st.integers(0, 64))
def test_plan_split_partitions_the_blocks(layers: int, head: int, tail: int) -> None:
    if head + tail >= layers:
        with pytest.raises(SplitError):
            plan_split(layers, client_head_layers=head, client_tail_layers=tail)
        return

    plan = plan_split(layers, client_head_layers=head, client_tail_layers=tail)

    assert [*plan.head, *plan.middle, *plan.tail] == list(range(layers))
    assert (len(plan.head), len(plan.tail)) == (head, tail)
    assert len(plan.middle) >= 1
    assert sorted(plan.layers_of("client") + plan.layers_of("server")) == plan.layers_of("full")


# ------------------------------------------------------------------ every architecture


def test_the_tiny_configs_cover_every_supported_class(tiny_model_configs: dict[str, dict[str, Any]]) -> None:
    assert set(tiny_model_configs) == set(ARCHS)
    classes = {
        type(build_skeleton(load_hf_config(ModelConfig(config=config)), "sdpa")).__name__
        for config in tiny_model_configs.values()
    }
    assert classes == set(ADAPTERS)


@pytest.mark.parametrize("arch", ARCHS)
def test_split_matches_full_model(
    arch: str, tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    _assert_split_matches_full(make_run_config(tiny_model_configs[arch]))


@pytest.mark.parametrize("arch", ARCHS)
def test_split_inference_matches_full_model_and_keeps_nothing(
    arch: str, tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    cfg = make_run_config(tiny_model_configs[arch])
    lm, server = _split_lm(cfg)
    full = build_full_model(cfg.model)
    ids, mask = _padded_batch(lengths=(4, 9))

    with torch.no_grad():
        split_logits = lm(ids, mask)
        full_logits = full(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits

    torch.testing.assert_close(split_logits, full_logits, **EXACT)
    assert server.pending_count() == 0
    assert server.stats.inferences == 1 and server.stats.forwards == 0


@pytest.mark.parametrize(("head", "tail"), [(0, 0), (2, 1), (0, 3), (3, 0)])
def test_other_cuts_match_full_model(
    head: int, tail: int, tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    cfg = make_run_config(
        tiny_model_configs["llama"], f"split.client_head_layers={head}", f"split.client_tail_layers={tail}"
    )
    _assert_split_matches_full(cfg)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_eager_attention_split_matches_full_model(
    arch: str, tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    _assert_split_matches_full(make_run_config(tiny_model_configs[arch], "model.attn_implementation=eager"))


@pytest.mark.parametrize("arch", ARCHS)
def test_each_side_allocates_only_its_part(arch: str, tiny_model_configs: dict[str, dict[str, Any]]) -> None:
    model_cfg = ModelConfig(config=tiny_model_configs[arch])
    plan = plan_split(4, client_head_layers=1, client_tail_layers=1)
    client = ClientBlocks(model_cfg, plan)
    middle = MiddleStack(model_cfg, plan)
    adapter = ADAPTERS[type(middle.hf).__name__]

    client_names = {name for name, _ in client.hf.named_parameters()}
    server_names = {name for name, _ in middle.hf.named_parameters()}
    full_names = {name for name, _ in build_full_model(model_cfg).named_parameters()}

    assert all(_layer_index(name, adapter.layers) in (1, 2) for name in server_names), sorted(server_names)
    assert {_layer_index(name, adapter.layers) for name in server_names} == {1, 2}
    non_block = {name for name in client_names if _layer_index(name, adapter.layers) is None}
    assert {_layer_index(name, adapter.layers) for name in client_names} - {None} == {0, 3}
    for path in (adapter.token_embedding, adapter.final_norm):
        assert any(name.startswith(f"{path}.") for name in non_block), f"client lacks {path}"
        assert not any(name.startswith(f"{path}.") for name in server_names), f"server holds {path}"
    assert not any(name.startswith(f"{adapter.lm_head}.") for name in server_names)
    assert client_names.isdisjoint(server_names)
    assert client_names | server_names == full_names
    for side in (client, middle):
        assert all(p.device.type == "cpu" for p in side.parameters()), "a parameter was left on the meta device"
        assert all(b.device.type == "cpu" for b in side.buffers()), "a buffer was left on the meta device"


def test_sides_draw_the_same_weights_as_the_full_model(tiny_model_configs: dict[str, dict[str, Any]]) -> None:
    model_cfg = ModelConfig(config=tiny_model_configs["qwen2"], init_seed=3)
    plan = plan_split(4, client_head_layers=1, client_tail_layers=1)
    full = build_full_model(model_cfg).state_dict()
    other_seed = build_full_model(ModelConfig(config=tiny_model_configs["qwen2"], init_seed=4)).state_dict()

    for side in (ClientBlocks(model_cfg, plan), MiddleStack(model_cfg, plan)):
        for name, tensor in side.hf_state_dict().items():
            assert torch.equal(tensor, full[name]), name
    name = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(full[name], other_seed[name])


# ------------------------------------------------------------------ unsupported models


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "bert", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128, "is_decoder": True},
        {"model_type": "opt", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "ffn_dim": 128, "word_embed_proj_dim": 64},
        {"model_type": "t5", "vocab_size": 128, "d_model": 64, "num_layers": 4, "num_heads": 4, "d_ff": 128},
    ],
    ids=["bert", "opt", "t5-no-causal-lm"],
)
def test_unsupported_model_is_rejected_listing_the_supported_classes(config: dict[str, Any]) -> None:
    model_cfg = ModelConfig(config=config)
    plan = plan_split(4, client_head_layers=1, client_tail_layers=1)

    for build in (lambda: ClientBlocks(model_cfg, plan), lambda: MiddleStack(model_cfg, plan), lambda: build_full_model(model_cfg)):
        with pytest.raises(UnsupportedModelError) as err:
            build()
        assert all(name in str(err.value) for name in ADAPTERS), str(err.value)


# --------------------------------------------------------------------- local checkpoints


def _split_logits_from(path: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    model_cfg = ModelConfig(path=str(path))
    plan = plan_split(4, client_head_layers=1, client_tail_layers=1)
    blocks, middle = ClientBlocks(model_cfg, plan), MiddleStack(model_cfg, plan)
    crossing = blocks.input_block(ids, mask)
    crossing.hidden = middle(crossing.hidden, crossing.attention_mask, crossing.position_ids)
    return blocks.output_block(crossing)


@pytest.mark.parametrize(("arch", "max_shard_size"), [("llama", None), ("llama", "100KB"), ("gpt2", None)])
def test_sides_load_a_local_checkpoint(
    arch: str, max_shard_size: str | None, tmp_path: Path, tiny_model_configs: dict[str, dict[str, Any]]
) -> None:
    saved = build_full_model(ModelConfig(config=tiny_model_configs[arch], init_seed=7))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    saved.save_pretrained(tmp_path, safe_serialization=True, **kwargs)
    if max_shard_size:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    ids, mask = _padded_batch(lengths=(7, 5))

    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
        split = _split_logits_from(tmp_path, ids, mask)
        full = build_full_model(ModelConfig(path=str(tmp_path)))(
            input_ids=ids, attention_mask=mask, position_ids=_positions(mask)
        ).logits

    torch.testing.assert_close(split, expected, **EXACT)
    torch.testing.assert_close(full, expected, **EXACT)


def test_missing_model_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"

    with pytest.raises(FileNotFoundError, match="no-such-model"):
        build_full_model(ModelConfig(path=str(missing)))


def test_model_directory_without_weights_is_named(tmp_path: Path, tiny_model_configs: dict[str, dict[str, Any]]) -> None:
    load_hf_config(ModelConfig(config=tiny_model_configs["llama"])).save_pretrained(tmp_path)

    with pytest.raises(FileNotFoundError, match="model.safetensors") as err:
        MiddleStack(ModelConfig(path=str(tmp_path)), plan_split(4, client_head_layers=1, client_tail_layers=1))
    assert str(tmp_path) in str(err.value)
