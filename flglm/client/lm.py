"""The causal LM a task trains: split across client and server, or whole (centralized).

Both classes map (input_ids, attention_mask) to logits, so the same task module trains either
one; that is how federated training is compared with centralized training of the same model.
"""

from __future__ import annotations

import torch
from torch import nn

from flglm.federation.remote import RemoteMiddle, ServerLink
from flglm.models.split import ClientBlocks, default_position_ids, max_positions_of, saved_state_dict


class SplitCausalLM(nn.Module):
    """Input block and output block here; the middle stack on the server."""

    def __init__(self, blocks: ClientBlocks, middle: RemoteMiddle) -> None:
        super().__init__()
        self.blocks = blocks
        self.middle = middle

    @property
    def link(self) -> ServerLink:
        return self.middle.link

    @property
    def max_positions(self) -> int | None:
        return self.blocks.max_positions

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        crossing = self.blocks.input_block(input_ids, attention_mask, position_ids)
        crossing.hidden = self.middle(crossing)
        return self.blocks.output_block(crossing)

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

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits

    def client_state_dict(self) -> dict[str, torch.Tensor]:
        return saved_state_dict(self.hf)
