"""What each side of the split needs in memory, computed from the model's config (not measured).

Per side: its base weights in ``model.dtype``, its LoRA adapters' training state (float32
weight, gradient and AdamW's two moments: 16 bytes per adapter parameter, every linear layer
of its blocks adapted, as ``peft.target_modules=[all-linear]``) and an activation estimate for
one training step: ``34 * batch * seq * hidden`` bytes per block (16-bit activations kept for
backward, attention scores not kept since SDPA does not store them; Korthikanti et al. 2022,
eq. 2 without its ``5as/h`` term), plus on the client the logits and the loss's float32 copy
(``6 * batch * seq * vocab`` bytes).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import AutoConfig

from flglm.models.adapters import adapter_for
from flglm.models.split import SplitPlan, _prune, build_skeleton

GIB = 2**30
ACTIVATION_BYTES_PER_BLOCK_TOKEN_HIDDEN = 34
LOGIT_BYTES_PER_TOKEN_VOCAB = 6

LLAMA_2_7B: dict[str, Any] = {
    "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
}  # fmt: skip
"""meta-llama/Llama-2-7b-hf's shapes."""
GLM_4_9B: dict[str, Any] = {
    "model_type": "glm", "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 13696, "num_hidden_layers": 40,
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "max_position_embeddings": 131072,
}  # fmt: skip
"""THUDM/glm-4-9b-hf's shapes."""


def side_memory(
    config: dict[str, Any], plan: SplitPlan, *, weight_bytes: int = 2, lora_r: int = 8, batch: int = 8, seq: int = 512
) -> dict[str, dict[str, float]]:
    """GiB per side (``client``, ``server``) and for the whole model (``full``): weights, LoRA state, activations, total."""
    kwargs = dict(config)
    hf_config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    out = {}
    for side in ("client", "server", "full"):
        model = build_skeleton(hf_config, "sdpa")
        adapter = adapter_for(type(model).__name__)
        if side != "full":
            _prune(model, adapter, plan, side)  # type: ignore[arg-type]
        blocks = adapter.get(model, adapter.layers)
        weights = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) * weight_bytes
        lora = sum(lora_r * (m.in_features + m.out_features) for m in blocks.modules() if isinstance(m, nn.Linear)) * 16
        tokens = batch * seq
        activations = len(blocks) * ACTIVATION_BYTES_PER_BLOCK_TOKEN_HIDDEN * tokens * hf_config.hidden_size
        if side != "server":
            activations += LOGIT_BYTES_PER_TOKEN_VOCAB * tokens * hf_config.vocab_size
        parts = {"weights_gb": weights / GIB, "lora_state_gb": lora / GIB, "activations_gb": activations / GIB}
        out[side] = {**{k: round(v, 2) for k, v in parts.items()}, "total_gb": round(sum(parts.values()), 2)}
    return out
