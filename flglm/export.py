"""Merge a finished run's parts into one Hugging Face model directory.

The client blocks (from one client: after the final FedAvg all clients hold the same ones)
and the server's middle stack are saved under the full model's parameter names, so merging
is a union of two state dicts. A LoRA run saved only the adapters: they are loaded onto the
base model (from ``model.path`` or the seeded init) and folded into its weights. Whoever runs
this holds both parts: in a real federation that is a decision of the parties, not something
the training does by itself.
"""

from __future__ import annotations

from pathlib import Path

from flglm.config import load_config
from flglm.models.lora import merge_lora
from flglm.models.split import build_full_model, saved_state_dict
from flglm.run_layout import client_weights_path, middle_weights_path, tokenizer_dir
from flglm.tensor_files import load_tensors


def export_run(run_dir: str | Path, out_dir: str | Path, *, client: int = 0) -> Path:
    """Write ``out_dir`` (config, safetensors weights, tokenizer) loadable by ``from_pretrained``."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.peft.method == "ptuning_v2":
        raise ValueError(
            "a P-tuning v2 run's prefixes are not weights of the Hugging Face model, so they cannot be folded "
            "into an exported directory; generate through the split with `flglm generate` instead"
        )
    weights = load_tensors(client_weights_path(run_dir, client))
    middle = load_tensors(middle_weights_path(run_dir))
    overlap = set(weights) & set(middle)
    if overlap:
        raise ValueError(f"client and server parts both hold {sorted(overlap)[:3]}: not parts of one split")
    weights.update(middle)
    model = build_full_model(cfg.model, cfg.peft)
    if cfg.peft.method == "lora":
        # The run saved adapters only: they go onto the base model, then fold into its weights.
        expected_adapters = set(saved_state_dict(model))
        if set(weights) != expected_adapters:
            raise ValueError(
                f"the run's parts hold {len(weights)} tensors, the model's LoRA adapters are {len(expected_adapters)} "
                f"(e.g. missing {sorted(expected_adapters - set(weights))[:3]}, unexpected {sorted(set(weights) - expected_adapters)[:3]})"
            )
        model.load_state_dict(weights, strict=False)
        weights = merge_lora(model).state_dict()
    expected = set(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(weights))
    if missing:
        raise ValueError(f"the run's parts lack {len(missing)} tensor(s) of the model, e.g. {missing[:3]}")
    model.load_state_dict(weights, strict=False)
    model.save_pretrained(out_dir)
    if tokenizer_dir(run_dir).is_dir():
        from flglm.data import load_tokenizer

        load_tokenizer(tokenizer_dir(run_dir)).save_pretrained(out_dir)
    return out_dir
