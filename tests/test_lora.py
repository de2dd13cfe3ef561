"""LoRA (``peft.method=lora``) through the split: the same model as the whole one, base frozen.

In one process: the client blocks talk to a local ``MiddleServer`` through the real link code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from flglm.config import RunConfig
from flglm.models import ClientBlocks, MiddleStack, build_full_model, plan_split
from flglm.models.lora import LORA_MARK
from flglm.models.split import saved_state_dict
from tests.test_split import (
    EXACT,
    _padded_batch,
    _positions,
    _run_both,
    _split_lm,
    assert_base_unchanged,
    move_lora_adapters,
    snapshot,
    train_steps,
)

LORA = ("peft.method=lora", "peft.lora_r=4")


@pytest.mark.parametrize("arch", ["glm", "llama", "gpt2"])
def test_split_with_lora_equals_the_whole_model_with_lora(
    arch: str, tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    cfg = make_run_config(tiny_model_configs[arch], *LORA)
    lm, server = _split_lm(cfg)
    full = build_full_model(cfg.model, cfg.peft)
    move_lora_adapters(lm, server, full)
    full_params = dict(full.named_parameters())
    _run_both(lm, full)

    split_params = [*lm.blocks.hf.named_parameters(), *server.middle.hf.named_parameters()]
    assert sorted(n for n, _ in split_params) == sorted(full_params)
    trainable = [(n, p) for n, p in split_params if p.requires_grad]
    assert trainable and all(LORA_MARK in n for n, _ in trainable)  # base weights frozen on both sides
    for name, param in split_params:
        if param.requires_grad:
            torch.testing.assert_close(param.grad, full_params[name].grad, **EXACT, msg=name)
        else:
            assert param.grad is None, f"{name} is frozen but got a gradient"
    server.close()


def test_sides_draw_the_same_adapters_as_the_whole_model(
    tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    cfg = make_run_config(tiny_model_configs["llama"], *LORA)
    plan = plan_split(4, client_head_layers=1, client_tail_layers=1)
    full = build_full_model(cfg.model, cfg.peft).state_dict()
    for side in (ClientBlocks(cfg.model, plan, cfg.peft), MiddleStack(cfg.model, plan, cfg.peft)):
        saved = side.hf_state_dict()
        assert saved and all(LORA_MARK in n for n in saved)  # a run saves the adapters only
        for name, tensor in side.hf.state_dict().items():
            assert torch.equal(tensor, full[name]), name
    assert set(saved_state_dict(build_full_model(cfg.model, cfg.peft))) == {n for n in full if LORA_MARK in n}


def test_training_steps_change_only_the_adapters(
    tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    cfg = make_run_config(tiny_model_configs["glm"], *LORA)
    lm, server = _split_lm(cfg)
    sides = {"client": lm.blocks.hf, "server": server.middle.hf}
    before = snapshot(sides)
    train_steps(lm, steps=3, lr=1e-2)

    for side, model in sides.items():
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[side][n])]
        assert changed, f"nothing trained on the {side}"
        assert all(LORA_MARK in n for n in changed), f"{side}: base weights changed: {[n for n in changed if LORA_MARK not in n]}"
    assert_base_unchanged(sides, before, lambda name: LORA_MARK in name)
    server.close()


@pytest.mark.multiprocess
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_client_lora_federation_equals_centralized_lora_training(tmp_path, dtype: str) -> None:
    from transformers import AutoModelForCausalLM

    from flglm.config import load_config
    from flglm.export import export_run
    from flglm.models.lora import merge_lora
    from flglm.tensor_files import load_tensors
    from tests.test_federation import federated_and_centralized, merged_weights, write_config

    # bfloat16: frozen base weights stored in bf16 on every side, adapters float32 (same tolerance: measured equal)
    config = write_config(tmp_path, model={"dtype": dtype}, peft={"method": "lora", "lora_r": 4}, optim={"lr": 0.02})
    fed_dir = tmp_path / "fed"
    fed, central = federated_and_centralized(tmp_path, config)
    cfg = load_config(config, [f"run_dir={tmp_path / 'central'}", "federation.num_clients=1"])
    assert fed["losses"] == pytest.approx(central["losses"], abs=1e-5)
    fed_weights = merged_weights(fed_dir)  # client and server files: adapters only
    central_weights = load_tensors(tmp_path / "central" / "centralized" / "model.safetensors")
    assert sorted(fed_weights) == sorted(central_weights) and all(LORA_MARK in n for n in fed_weights)
    initial = saved_state_dict(build_full_model(cfg.model, cfg.peft))
    for name, value in central_weights.items():
        torch.testing.assert_close(fed_weights[name], value, atol=1e-5, rtol=0, msg=name)
    assert any(not torch.equal(fed_weights[n], initial[n]) for n in initial)  # the adapters trained
    # export folds the adapters into the base weights: the result computes what the trained model computes
    exported = AutoModelForCausalLM.from_pretrained(export_run(fed_dir, tmp_path / "exported"))
    trained = build_full_model(cfg.model, cfg.peft)
    trained.load_state_dict(central_weights, strict=False)
    ids, mask = _padded_batch(vocab=200)
    with torch.no_grad():
        expected = trained(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
        merged = merge_lora(trained)(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
        got = exported(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
    # bf16: folding the float32 adapters into bf16 base weights rounds them; measured 1.95e-3 (one bf16 step at |logit| < 0.5)
    merge_atol = 1e-4 if dtype == "float32" else 4e-3
    torch.testing.assert_close(merged, expected, atol=merge_atol, rtol=0)
    torch.testing.assert_close(got, expected, atol=merge_atol, rtol=0)
