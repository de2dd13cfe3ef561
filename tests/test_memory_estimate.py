"""The per-side memory estimate (README "GPUs"): its weight and adapter counts are those of the sides really built."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from flglm.config import RunConfig
from flglm.models import ClientBlocks, MiddleStack, plan_split
from flglm.models.lora import LORA_MARK
from flglm.models.memory_estimate import GIB, LLAMA_2_7B, side_memory


@pytest.mark.parametrize("arch", ["glm", "llama"])
def test_weights_and_lora_state_match_the_built_sides(arch: str, tiny_model_configs: dict, make_run_config: Callable[..., RunConfig]) -> None:
    cfg = make_run_config(tiny_model_configs[arch], "model.dtype=bfloat16", "peft.method=lora", "peft.lora_r=4")
    plan = plan_split(4, client_head_layers=1, client_tail_layers=1)
    estimate = side_memory(tiny_model_configs[arch], plan, lora_r=4, batch=2, seq=8)
    for name, side in (("client", ClientBlocks(cfg.model, plan, cfg.peft)), ("server", MiddleStack(cfg.model, plan, cfg.peft))):
        params = dict(side.hf.named_parameters())
        base = sum(p.numel() * p.element_size() for n, p in params.items() if LORA_MARK not in n)
        adapters = sum(p.numel() for n, p in params.items() if LORA_MARK in n)
        assert estimate[name]["weights_gb"] == round(base / GIB, 2)
        assert estimate[name]["lora_state_gb"] == round(adapters * 16 / GIB, 2)


def test_llama_2_7b_weighs_what_its_parameter_count_says() -> None:
    memory = side_memory(LLAMA_2_7B, plan_split(32, client_head_layers=1, client_tail_layers=1))
    assert memory["full"]["weights_gb"] == round(6_738_415_616 * 2 / GIB, 2)  # Llama-2-7B's published count, bf16
    assert memory["client"]["weights_gb"] + memory["server"]["weights_gb"] == pytest.approx(memory["full"]["weights_gb"], abs=0.011)
    assert memory["server"]["total_gb"] > memory["client"]["total_gb"]
