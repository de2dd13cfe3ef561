"""Cut a Hugging Face causal LM into the client's blocks and the server's middle stack.

Two steps, as in pipeline-parallel planners: ``plan_split`` is pure arithmetic on layer
counts (testable without a model), ``build_side`` builds only the modules one side owns.
The whole model is first built on the ``meta`` device (no memory), the modules the side does
not own are dropped, and only what is left is allocated and filled — from a local checkpoint
or from a seeded random initialisation. A server therefore never allocates the embedding or
the LM head, and a client never allocates the middle stack; from a checkpoint each side opens
only the shards holding its own tensors (:mod:`flglm.models.pretrained`).

Kept modules keep their Hugging Face names (``model.layers.5.mlp...``), so a side's
``state_dict`` loads from and saves to the original checkpoint layout, and the parts of all
sides merge back into the full model by key.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from flglm.config import ModelConfig, PeftConfig, SplitConfig
from flglm.devices import to_compute, to_link  # tensors cross the link on the CPU (sealed there); each side moves them to its device
from flglm.link.crossing import Crossing
from flglm.models.adapters import ADAPTERS, ArchitectureAdapter, UnsupportedModelError, adapter_for
from flglm.models.dtypes import frozen_weight_dtype, keep_trainable_float32
from flglm.models.lora import inject_lora, injected_names, trainable_state_dict
from flglm.models.prefix import PREFIX_MODULE, PrefixKV, prefilled_cache, prefilled_rows_cache, prefix_length_of, prefix_of, with_prefix_mask
from flglm.models.pretrained import LoadingReport, load_local

Side = Literal["client", "server", "full"]


class SplitError(ValueError):
    """The requested cut does not fit the model."""


@dataclass(frozen=True)
class SplitPlan:
    """Which transformer blocks each side runs, by index in the full model."""

    num_layers: int
    head: range
    middle: range
    tail: range

    def layers_of(self, side: Side) -> list[int]:
        if side == "client":
            return [*self.head, *self.tail]
        if side == "server":
            return list(self.middle)
        return list(range(self.num_layers))


def plan_split(num_layers: int, *, client_head_layers: int, client_tail_layers: int) -> SplitPlan:
    """Blocks ``[0, head)`` and ``[L - tail, L)`` stay on the client, the rest on the server."""
    if client_head_layers < 0 or client_tail_layers < 0:
        raise SplitError(f"client_head_layers={client_head_layers} and client_tail_layers={client_tail_layers} must be >= 0")
    on_client = client_head_layers + client_tail_layers
    if on_client >= num_layers:
        raise SplitError(
            f"the split keeps {client_head_layers} + {client_tail_layers} = {on_client} blocks on the client "
            f"but the model has only {num_layers} blocks: the server needs at least one "
            f"(client_head_layers + client_tail_layers must be < {num_layers})"
        )
    return SplitPlan(
        num_layers=num_layers,
        head=range(client_head_layers),
        middle=range(client_head_layers, num_layers - client_tail_layers),
        tail=range(num_layers - client_tail_layers, num_layers),
    )


def plan_for(model_cfg: ModelConfig, split_cfg: SplitConfig) -> SplitPlan:
    """The split plan the configuration asks for, checked against the model's block count."""
    return plan_split(
        num_layers_of(load_hf_config(model_cfg)),
        client_head_layers=split_cfg.client_head_layers,
        client_tail_layers=split_cfg.client_tail_layers,
    )


def load_hf_config(model_cfg: ModelConfig) -> PretrainedConfig:
    """The Hugging Face config, from ``model.path`` or from the ``model.config`` dict."""
    if model_cfg.path is not None:
        path = Path(model_cfg.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path={path} has no config.json (models are only read from local directories)")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    else:
        kwargs = dict(model_cfg.config)
        model_type = kwargs.pop("model_type")
        config = AutoConfig.for_model(model_type, **kwargs)
    config.use_cache = False
    return config


def num_layers_of(config: PretrainedConfig) -> int:
    return int(config.num_hidden_layers)


def max_positions_of(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position embedding covers (None: unbounded)."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value is not None else None


def build_skeleton(config: PretrainedConfig, attn_implementation: str) -> nn.Module:
    """The full model on the meta device: its structure and names, no memory."""
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        # Otherwise transformers raises a plain ValueError listing every causal LM it knows.
        raise UnsupportedModelError(f"model_type {config.model_type!r} has no causal LM class; supported: {', '.join(sorted(ADAPTERS))}")
    with torch.device("meta"):
        # float32 whatever the config's dtype (a bf16 checkpoint's): see flglm.models.pretrained.
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    adapter_for(type(model).__name__)  # fail early, listing the supported classes
    return model


def _set(root: nn.Module, dotted: str, module: nn.Module | None) -> None:
    parent_path, _, name = dotted.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _prune(model: nn.Module, adapter: ArchitectureAdapter, plan: SplitPlan, side: Side) -> None:
    """Drop what ``side`` does not own; blocks go into a ModuleDict keyed by their index."""
    layers = adapter.get(model, adapter.layers)
    kept = nn.ModuleDict({str(i): layers[i] for i in plan.layers_of(side)})
    _set(model, adapter.layers, kept)
    if side == "server":
        for path in adapter.client_module_paths():
            _set(model, path, None)


def _rebuild_rotary(model: nn.Module, adapter: ArchitectureAdapter, device: torch.device) -> None:
    """Rotary tables are non-persistent buffers: recompute them on ``device`` from the config."""
    if adapter.rotary is None:
        return
    old = adapter.get(model, adapter.rotary)
    _set(model, adapter.rotary, type(old)(config=model.config).to(device))


def _tie_head(model: nn.Module, adapter: ArchitectureAdapter, side: Side) -> None:
    if side != "server" and getattr(model.config, "tie_word_embeddings", False):
        adapter.get(model, adapter.lm_head).weight = adapter.get(model, adapter.token_embedding).weight


def _norm_parameter_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            names.update(f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False))
    return names


def init_random(model: nn.Module, *, seed: int) -> None:
    """Seeded random initialisation, one stream per parameter name.

    Each parameter's values depend only on (seed, its name), so the client, the server and a
    centralized copy of the model draw identical weights without building each other's parts.
    Norm weights start at 1, biases at 0, everything else N(0, initializer_range).
    """
    redraw(model, [name for name, _ in model.named_parameters()], lambda name: torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode())))


def redraw(model: nn.Module, names: Iterable[str], generator_for: Callable[[str], torch.Generator]) -> None:
    """Draw the named parameters as :func:`init_random` does, each matrix from ``generator_for(name)``.

    Shared by the public initialisation (a name-keyed seed) and the client's secret one
    (:func:`flglm.privacy.defenses.apply_secret_init`), so both draw from one distribution.
    """
    std = float(getattr(model.config, "initializer_range", 0.02))
    norms = _norm_parameter_names(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            param = params[name]
            if name in norms:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator_for(name), dtype=torch.float32) * std)


def build_side(
    model_cfg: ModelConfig, plan: SplitPlan | None, side: Side, peft_cfg: PeftConfig | None = None, *, device: torch.device | str = "cpu"
) -> nn.Module:
    """Build, allocate (on ``device``, frozen weights in ``model.dtype``: :mod:`flglm.models.dtypes`)
    and fill the modules of ``side`` (``plan`` may be None for ``full``);
    with ``peft_cfg.method=lora``, add frozen-base LoRA adapters (:mod:`flglm.models.lora`);
    with ``ptuning_v2``, freeze every weight and give the client (and the whole model) the
    prefix encoder (:mod:`flglm.models.prefix`) as submodule ``prefix_encoder``."""
    config = load_hf_config(model_cfg)
    model = build_skeleton(config, model_cfg.attn_implementation)
    adapter = adapter_for(type(model).__name__)
    lora = peft_cfg is not None and peft_cfg.method == "lora"
    # The whole model's parameter order, which global-norm clipping must follow to match
    # centralized clipping bit for bit (recorded before the other side's modules are dropped).
    if lora:
        full_order = injected_names(build_skeleton(config, model_cfg.attn_implementation), peft_cfg)
    else:
        full_order = [name for name, _ in model.named_parameters()]
    if side != "full":
        assert plan is not None, "a client or server side needs a split plan"
        _prune(model, adapter, plan, side)
    model.to(frozen_weight_dtype(model_cfg, config, peft_cfg))  # still on meta: no memory yet
    model.to_empty(device=device)
    _rebuild_rotary(model, adapter, torch.device(device))
    _tie_head(model, adapter, side)
    if model_cfg.path is not None:
        # What this side opened and read, for the run's record (flglm.models.pretrained.LoadingReport).
        model.flglm_loading_report = load_local(model, model_cfg.path)
    else:
        init_random(model, seed=model_cfg.init_seed)
    if lora:
        model = inject_lora(model, peft_cfg, seed=model_cfg.init_seed)
    ptuning = peft_cfg is not None and peft_cfg.method == "ptuning_v2"
    if ptuning:
        model.requires_grad_(False)
        prefix = PrefixKV(config, peft_cfg, seed=model_cfg.init_seed).to(device)
        full_order += [f"{PREFIX_MODULE}.{name}" for name, _ in prefix.named_parameters()]
        if side != "server":
            setattr(model, PREFIX_MODULE, prefix)
    keep_trainable_float32(model)
    model.flglm_full_parameter_order = full_order
    model.flglm_adapters_only = lora or ptuning
    return model


def run_blocks(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    layer_ids: Iterable[int],
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Cache | None = None,
) -> torch.Tensor:
    """Run the given blocks exactly as the full model's decoder loop would.

    With a ``cache`` (generation), the blocks append their keys/values to it and attend to
    what it already holds; ``attention_mask`` then covers the cached tokens and the new ones.
    Each side's cache only has entries for its own blocks, so the mask is sized against the
    first of them (the default, block 0, is empty on the server).
    """
    layer_ids = list(layer_ids)
    if not layer_ids:
        return hidden
    mask = create_causal_mask(
        config=model.config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        cache=cache,
        position_ids=position_ids,
        layer_idx=layer_ids[0] if cache is not None else None,
    )
    rotary = adapter.get(model, adapter.rotary) if adapter.rotary else None
    position_embeddings = adapter.position_embeddings(rotary, hidden, position_ids)
    layers = adapter.get(model, adapter.layers)
    for i in layer_ids:
        hidden = adapter.call_block(
            layers[str(i)],
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            cache=cache,
        )
    return hidden


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0..T-1 on every row, as the Hugging Face models use for right-padded batches."""
    batch, length = attention_mask.shape
    return torch.arange(length, device=attention_mask.device).unsqueeze(0).expand(batch, length).contiguous()


class ClientBlocks(nn.Module):
    """The client's part: input block (embedding + head blocks), output block (tail blocks,
    final norm, LM head). The ``hf`` submodule keeps the Hugging Face names."""

    def __init__(self, model_cfg: ModelConfig, plan: SplitPlan, peft_cfg: PeftConfig | None = None, *, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.hf = build_side(model_cfg, plan, "client", peft_cfg, device=device)
        self.adapter = adapter_for(type(self.hf).__name__)
        self.plan = plan

    @property
    def hidden_size(self) -> int:
        return int(self.hf.config.hidden_size)

    @property
    def device(self) -> torch.device:  # where the client blocks compute
        return self.adapter.get(self.hf, self.adapter.token_embedding).weight.device

    @property
    def max_positions(self) -> int | None:
        return max_positions_of(self.hf.config)

    @property
    def prefix_length(self) -> int:
        return prefix_length_of(self.hf)

    def prefixes(self) -> torch.Tensor | None:
        """Every block's key/value prefix (P-tuning v2), or None."""
        prefix = prefix_of(self.hf)
        return prefix() if prefix is not None else None

    def prefix_cache(self, prefixes: torch.Tensor | None, batch: int) -> Cache | None:
        """A cache holding the client blocks' prefixes for ``batch`` rows (None without prefixes)."""
        if prefixes is None:
            return None
        layers = self.plan.layers_of("client")
        return prefilled_cache(self.hf.config, prefixes[layers], layers, batch)

    def server_prefixes(self, prefixes: torch.Tensor | None) -> torch.Tensor | None:
        """The part of the prefixes that crosses the link (on the CPU): the server's blocks'."""
        return None if prefixes is None else to_link(prefixes[list(self.plan.middle)])

    def input_block(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> Crossing:
        device = self.device
        input_ids, attention_mask = to_compute(input_ids, device), to_compute(attention_mask, device)
        position_ids = default_position_ids(attention_mask) if position_ids is None else to_compute(position_ids, device)
        hidden = self.adapter.embed(self.hf, input_ids, position_ids)
        hidden = run_blocks(self.hf, self.adapter, self.plan.head, hidden, with_prefix_mask(attention_mask, self.prefix_length), position_ids, cache)
        return Crossing(to_link(hidden), to_link(attention_mask), to_link(position_ids))

    def output_block(self, crossing: Crossing, cache: Cache | None = None) -> torch.Tensor:
        device = self.device
        mask = with_prefix_mask(to_compute(crossing.attention_mask, device), self.prefix_length)
        hidden = run_blocks(
            self.hf, self.adapter, self.plan.tail, to_compute(crossing.hidden, device), mask, to_compute(crossing.position_ids, device), cache
        )
        hidden = self.adapter.get(self.hf, self.adapter.final_norm)(hidden)
        return self.adapter.get(self.hf, self.adapter.lm_head)(hidden)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return saved_state_dict(self.hf)


class MiddleStack(nn.Module):
    """The server's part: the blocks between the client's head and tail."""

    def __init__(self, model_cfg: ModelConfig, plan: SplitPlan, peft_cfg: PeftConfig | None = None, *, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.hf = build_side(model_cfg, plan, "server", peft_cfg, device=device)
        self.adapter = adapter_for(type(self.hf).__name__)
        self.plan = plan

    @property
    def hidden_size(self) -> int:
        return int(self.hf.config.hidden_size)

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache | None = None,
        prefix_length: int = 0,
    ) -> torch.Tensor:
        """``cache`` holds the blocks' P-tuning prefixes (``prefix_length`` positions, which the
        mask gains in front) and, when decoding, the tokens seen so far."""
        device = self.device
        mask = with_prefix_mask(to_compute(attention_mask, device), prefix_length)
        out = run_blocks(self.hf, self.adapter, self.plan.middle, to_compute(hidden, device), mask, to_compute(position_ids, device), cache)
        return to_link(out) if hidden.device.type == "cpu" else out  # answered where the input came from

    @property
    def device(self) -> torch.device:  # where the middle stack computes
        return next(self.hf.parameters()).device

    def prefix_cache(self, prefixes: torch.Tensor, batch: int) -> Cache:
        """A cache holding the prefixes a client sent for the middle blocks, for ``batch`` rows."""
        return prefilled_cache(self.hf.config, prefixes.to(self.device), list(self.plan.middle), batch)

    def prefix_cache_rows(self, row_prefixes: torch.Tensor) -> Cache:
        """A cache holding each row's own prefixes for the middle blocks (client batching:
        the rows of a gathered batch come from clients with different prefixes)."""
        return prefilled_rows_cache(self.hf.config, row_prefixes.to(self.device), list(self.plan.middle))

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return saved_state_dict(self.hf)


def build_full_model(model_cfg: ModelConfig, peft_cfg: PeftConfig | None = None) -> nn.Module:
    """The whole Hugging Face model with the same weights the split sides get (centralized reference)."""
    return build_side(model_cfg, None, "full", peft_cfg)


def loading_report_of(model: nn.Module) -> LoadingReport | None:
    """What ``build_side`` read of a checkpoint for this side (None for a random initialisation)."""
    return getattr(model, "flglm_loading_report", None)


def saved_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a run saves of a side: every tensor, or with adapters (LoRA) only the adapters."""
    return trainable_state_dict(model) if getattr(model, "flglm_adapters_only", False) else model.state_dict()
