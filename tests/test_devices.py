"""Devices and dtypes (issue 19): settings resolved to a device, frozen weights in ``model.dtype``,
each side allocating exactly its own part, and bf16 split == bf16 whole model.

CUDA-only checks skip with a reason here (no GPU); ``benchmarks/gpu.py`` runs them on a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from flglm.config import ConfigError, ModelConfig, RunConfig
from flglm.devices import active_autocast, autocast_for, lightning_accelerator, memory_summary, peak_memory, resolve_device
from flglm.models import ClientBlocks, MiddleStack, build_full_model, plan_split
from flglm.models.adapters import ADAPTERS
from flglm.models.dtypes import requested_dtype
from flglm.models.lora import LORA_MARK
from flglm.models.prefix import PREFIX_MODULE
from tests.test_split import _layer_index, _padded_batch, _positions, _split_lm, move_lora_adapters

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is absent")
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
BF16_VS_FP32_ATOL = 2e-2
"""bf16 weights vs the float32 model, logits of magnitude ~0.5: measured max error 8.0e-3 (glm), 7.7e-3 (llama)."""


@NO_CUDA
@pytest.mark.parametrize("setting", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_a_config_error_naming_the_setting(setting: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_device(setting, key="server.device")
    assert str(err.value) == f"server.device={setting}: CUDA is not available on this machine (torch.cuda.is_available() is False)"


@NO_CUDA
def test_auto_picks_the_cpu_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="flglm"):
        assert resolve_device("auto", key="client.device") == torch.device("cpu")
    assert "client.device=auto: using the CPU (torch.cuda.is_available() is False)" in caplog.text


@NEEDS_CUDA
def test_cuda_takes_the_local_ranks_gpu() -> None:
    count = torch.cuda.device_count()
    assert resolve_device("cuda", key="server.device", local_rank=count + 1) == torch.device("cuda", (count + 1) % count)
    with pytest.raises(ConfigError, match=f"server.device=cuda:{count}: this machine has {count} GPU"):
        resolve_device(f"cuda:{count}", key="server.device")


def test_cpu_and_lightnings_accelerator() -> None:
    assert resolve_device("cpu", key="server.device") == torch.device("cpu")
    assert lightning_accelerator(torch.device("cpu")) == {"accelerator": "cpu", "devices": 1}
    assert lightning_accelerator(torch.device("cuda", 3)) == {"accelerator": "cuda", "devices": [3]}


@pytest.mark.parametrize(("key", "value"), [("server.device", "gpu"), ("client.device", "cuda:x"), ("model.dtype", "fp8")])
def test_bad_device_or_dtype_settings_are_named(key: str, value: str, tiny_model_configs: dict, make_run_config: Callable[..., RunConfig]) -> None:
    with pytest.raises(ConfigError, match=f"{key}={value!r}"):
        make_run_config(tiny_model_configs["glm"], f"{key}={value}")


def test_autocast_follows_the_device_type() -> None:
    assert active_autocast() == ""
    with autocast_for(torch.device("cpu"), torch.bfloat16):
        assert active_autocast() == "bfloat16"
        assert torch.is_autocast_enabled("cpu")
    with autocast_for("cpu", None):
        assert active_autocast() == ""


def test_peak_memory_and_its_summary() -> None:
    own = peak_memory(torch.device("cpu"))
    assert own["peak_host_mb"] > 10 and "peak_device_mb" not in own
    clients = {"0": {"train_loss": 1.0, "peak_host_mb": 5.0}}
    assert memory_summary(own, clients) == {"server": own, "clients": {"0": {"peak_host_mb": 5.0}}}


def test_auto_dtype_is_the_checkpoints_or_float32_for_random_init() -> None:
    assert requested_dtype(ModelConfig(config={"model_type": "glm"}, dtype="auto"), SimpleNamespace(dtype=torch.bfloat16)) == torch.float32
    assert requested_dtype(ModelConfig(path="ckpt", dtype="auto"), SimpleNamespace(dtype=torch.bfloat16)) == torch.bfloat16
    assert requested_dtype(ModelConfig(path="ckpt", dtype="auto"), SimpleNamespace(dtype="float16", torch_dtype=None)) == torch.float16
    assert requested_dtype(ModelConfig(path="ckpt", dtype="auto"), SimpleNamespace(dtype=None, torch_dtype=None)) == torch.float32
    assert requested_dtype(ModelConfig(path="ckpt", dtype="bfloat16"), SimpleNamespace(dtype=torch.float32)) == torch.bfloat16


@pytest.mark.parametrize(
    ("peft", "trains"),
    [(("peft.method=lora", "peft.lora_r=4"), lambda n: LORA_MARK in n), (("peft.method=ptuning_v2",), lambda n: n.startswith(PREFIX_MODULE)), ((), lambda n: True)],
    ids=["lora", "ptuning_v2", "none"],
)
def test_frozen_weights_are_stored_in_bf16_and_what_trains_in_float32(
    peft: tuple[str, ...], trains: Callable[[str], bool], tiny_model_configs: dict, make_run_config: Callable[..., RunConfig]
) -> None:
    cfg = make_run_config(tiny_model_configs["llama"], "model.dtype=bfloat16", *peft)
    plan = plan_split(4, client_head_layers=1, client_tail_layers=1)
    for side in (ClientBlocks(cfg.model, plan, cfg.peft), MiddleStack(cfg.model, plan, cfg.peft)):
        for name, param in side.hf.named_parameters():
            assert param.requires_grad == trains(name), name
            assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), (name, param.dtype)


def _own_part_bytes(full: torch.nn.Module, layers_path: str, plan: Any, side: str) -> int:
    """Bytes of the whole model's parameters that belong to ``side`` by the plan: its blocks and,
    for the client, everything outside the block stack (embedding, final norm, LM head)."""
    total, seen = 0, set()
    for name, param in full.named_parameters():
        layer = _layer_index(name, layers_path)
        mine = layer in plan.layers_of(side) if layer is not None else side == "client"
        if mine and param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel() * param.element_size()
    return total


def _side_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in module.parameters()}.values())


@pytest.mark.parametrize("arch", ["glm", "llama"])
@pytest.mark.parametrize("settings", [(), ("model.dtype=bfloat16", "peft.method=lora", "peft.lora_r=4")], ids=["fp32", "bf16-lora"])
def test_each_side_allocates_exactly_its_own_parts_bytes(
    arch: str, settings: tuple[str, ...], tiny_model_configs: dict, make_run_config: Callable[..., RunConfig]
) -> None:
    cfg = make_run_config(tiny_model_configs[arch], *settings)
    plan = plan_split(4, client_head_layers=1, client_tail_layers=1)
    full = build_full_model(cfg.model, cfg.peft)
    layers_path = ADAPTERS[type(full).__name__].layers
    client, middle = ClientBlocks(cfg.model, plan, cfg.peft), MiddleStack(cfg.model, plan, cfg.peft)
    assert _side_bytes(client.hf) == _own_part_bytes(full, layers_path, plan, "client")
    assert _side_bytes(middle.hf) == _own_part_bytes(full, layers_path, plan, "server")
    assert _side_bytes(client.hf) + _side_bytes(middle.hf) == _side_bytes(full)


@pytest.mark.parametrize("arch", ["glm", "llama"])
def test_bf16_split_equals_the_bf16_whole_model(arch: str, tiny_model_configs: dict, make_run_config: Callable[..., RunConfig]) -> None:
    # Prepare: frozen bf16 base, float32 LoRA adapters moved off zero (identically on both)
    logits = {}
    for dtype in ("float32", "bfloat16"):
        cfg = make_run_config(tiny_model_configs[arch], f"model.dtype={dtype}", "peft.method=lora", "peft.lora_r=4")
        lm, server = _split_lm(cfg)
        full = build_full_model(cfg.model, cfg.peft)
        move_lora_adapters(lm, server, full)
        ids, mask = _padded_batch()
        # Execute
        with torch.no_grad():
            split = lm(ids, mask)
            whole = full(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
        server.close()
        # Assert: the split computes what the whole model computes in the same dtype (measured: 0.0)
        assert split.dtype == whole.dtype == getattr(torch, dtype)
        torch.testing.assert_close(split, whole, atol=1e-5, rtol=0)
        logits[dtype] = split.float()
    torch.testing.assert_close(logits["bfloat16"], logits["float32"], atol=BF16_VS_FP32_ATOL, rtol=0)
