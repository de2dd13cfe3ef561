"""The causal LM a task trains: split across client and server, or whole (centralized).

Both classes map (input_ids, attention_mask) to logits, so the same task module trains either
one; that is how federated training is compared with centralized training of the same model.
Both also decode incrementally with key/value caches (``open_decoding``/``decode``/
``close_decoding``), which :func:`flglm.client.decoding.generate` drives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig

from flglm.client.remote import RemoteMiddle
from flglm.client.server_link import ServerLink
from flglm.models.prefix import prefilled_cache, prefix_length_of, prefix_of, with_prefix_mask
from flglm.models.split import ClientBlocks, default_position_ids, max_positions_of, saved_state_dict

if TYPE_CHECKING:  # only an annotation here: flglm.privacy may import this module
    from flglm.privacy.defenses import PrivacyGuard


@dataclass
class SplitDecoding:
    """A generation in progress: the caches of the client's blocks and the server's session.

    The cache is made at the first step, when the batch size is known (P-tuning prefixes are
    stored in it for every row)."""

    session: int
    cache: DynamicCache | None = None
    past: int = 0


class SplitCausalLM(nn.Module):
    """Input block and output block here; the middle stack on the server.

    With a ``guard`` (``privacy`` config), what the server sees is blurred: the hidden states
    sent pass ``guard.hidden`` and the gradient returned for the middle's output passes
    ``guard.gradient``. Without one, nothing is added to the computation."""

    def __init__(self, blocks: ClientBlocks, middle: RemoteMiddle, guard: PrivacyGuard | None = None) -> None:
        super().__init__()
        self.blocks = blocks
        self.middle = middle
        self.guard = guard

    def _send(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.guard is None else self.guard.hidden(hidden)

    def _received(self, output: torch.Tensor) -> torch.Tensor:
        return output if self.guard is None else self.guard.gradient(output)

    @property
    def link(self) -> ServerLink:
        return self.middle.link

    @property
    def max_positions(self) -> int | None:
        return self.blocks.max_positions

    @property
    def hf_config(self) -> PretrainedConfig:
        return self.blocks.hf.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        prefixes = self.blocks.prefixes()  # P-tuning v2; None otherwise
        cache = self.blocks.prefix_cache(prefixes, input_ids.shape[0])
        crossing = self.blocks.input_block(input_ids, attention_mask, position_ids, cache)
        crossing.hidden = self._send(crossing.hidden)
        crossing.prefix = self.blocks.server_prefixes(prefixes)
        crossing.hidden = self._received(self.middle(crossing))
        return self.blocks.output_block(crossing, cache)

    def open_decoding(self) -> SplitDecoding:
        return SplitDecoding(self.link.open_decoding())

    def decode(self, state: SplitDecoding, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the new tokens; ``attention_mask`` covers the cached tokens and the new ones.

        The input block and the output block use the client's cache, the middle stack the
        server's cache of this session, so only the new tokens' hidden states cross the link."""
        server_prefixes = None
        if state.cache is None:
            prefixes = self.blocks.prefixes()
            state.cache = self.blocks.prefix_cache(prefixes, input_ids.shape[0]) or DynamicCache(config=self.hf_config)
            server_prefixes = self.blocks.server_prefixes(prefixes)  # sent once, with the prompt
        crossing = self.blocks.input_block(input_ids, attention_mask, position_ids, cache=state.cache)
        crossing.hidden = self._send(crossing.hidden)
        crossing.prefix = server_prefixes
        crossing.hidden = self._received(self.link.decode(state.session, state.past, crossing))
        logits = self.blocks.output_block(crossing, cache=state.cache)
        state.past += input_ids.shape[1]
        return logits

    def close_decoding(self, state: SplitDecoding) -> None:
        self.link.end_decoding(state.session)

    def client_state_dict(self) -> dict[str, torch.Tensor]:
        """The client blocks under the Hugging Face parameter names."""
        return self.blocks.hf_state_dict()

    def named_parameters_hf(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self.blocks.hf.named_parameters())

    @property
    def server_parameter_names(self) -> list[str]:
        return self.middle.server_parameter_names

    def full_parameter_order(self) -> list[str]:
        return self.blocks.hf.flglm_full_parameter_order


class FullCausalLM(nn.Module):
    """The whole Hugging Face model in one process: the centralized reference."""

    link = None

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    @property
    def max_positions(self) -> int | None:
        return max_positions_of(self.hf.config)

    @property
    def hf_config(self) -> PretrainedConfig:
        return self.hf.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        return self._logits(input_ids, attention_mask, position_ids, self._prefix_cache(input_ids.shape[0]))

    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache | None) -> torch.Tensor:
        """The model on the tokens; ``cache`` holds P-tuning prefixes and, decoding, the past tokens."""
        mask = with_prefix_mask(attention_mask, prefix_length_of(self.hf))
        return self.hf(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=cache is not None).logits

    def _prefix_cache(self, batch: int) -> DynamicCache | None:
        """P-tuning v2: every block's prefix in a cache, as peft feeds prefixes to a whole model."""
        prefix = prefix_of(self.hf)
        if prefix is None:
            return None
        return prefilled_cache(self.hf.config, prefix(), list(range(prefix.num_layers)), batch)

    def open_decoding(self) -> list[DynamicCache]:
        return []  # filled at the first step, when the batch size is known

    def decode(self, state: list[DynamicCache], input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if not state:
            state.append(self._prefix_cache(input_ids.shape[0]) or DynamicCache(config=self.hf.config))
        return self._logits(input_ids, attention_mask, position_ids, state[0])

    def close_decoding(self, state: list[DynamicCache]) -> None:
        state.clear()

    def client_state_dict(self) -> dict[str, torch.Tensor]:
        return saved_state_dict(self.hf)
