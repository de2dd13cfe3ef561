"""Only hidden states, the padding mask, position ids and gradients cross the link."""

from __future__ import annotations

from typing import Any

import torch
from conftest import TINY_MODEL_CONFIGS

from flglm.client.lm import SplitCausalLM
from flglm.client.remote import RemoteMiddle
from flglm.client.server_link import ServerLink
from flglm.config import ModelConfig, RunConfig, fingerprint
from flglm.models import ClientBlocks, plan_split
from flglm.server.endpoint import ServerEndpoint
from flglm.server.middle_server import MiddleServer


class RecordingLink(ServerLink):
    """A link that keeps every call it makes, as a wiretap on the client-server channel would."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, tuple]] = []

    def exchange(self, kind: str, tensors: list[torch.Tensor], **kwargs: Any) -> list[torch.Tensor]:
        self.calls.append((kind, tuple(tensors)))
        return super().exchange(kind, tensors, **kwargs)


def test_a_training_step_sends_nothing_but_hidden_states_masks_positions_and_gradients() -> None:
    # Prepare
    cfg = RunConfig()
    cfg.model = ModelConfig(config=dict(TINY_MODEL_CONFIGS["llama"]))
    server = MiddleServer(cfg)
    link = RecordingLink(ServerEndpoint(server), client_id=0, timeout_s=10)
    info = link.hello(fingerprint(cfg), "tok")
    lm = SplitCausalLM(ClientBlocks(cfg.model, plan_split(4, client_head_layers=1, client_tail_layers=1)), RemoteMiddle(link, server_info=info))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    ids = torch.randint(3, 128, (2, 8)).masked_fill(mask == 0, 0)
    labels = torch.randint(3, 128, (2, 8))

    # Execute: one training step and one evaluation forward.
    logits = lm(ids, mask)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    link.step(client_step=0, total_steps=1)
    with torch.no_grad():
        lm(ids, mask)

    # Assert
    names = [name for name, _ in link.calls[1:]]
    assert names == ["forward", "backward", "step", "infer"]
    tensors = {name: args for name, args in link.calls[1:]}
    for name in ("forward", "infer"):
        hidden, sent_mask, positions, control = tensors[name]
        assert hidden.dtype == torch.float32 and hidden.shape == (2, 8, 64)
        assert torch.equal(sent_mask, mask)
        assert torch.equal(positions.expand(2, 8), torch.arange(8).expand(2, 8))
        assert control.tolist() == [0]  # autocast: none
    (grad,) = tensors["backward"]
    assert grad.shape == (2, 8, 64)
    (step_control,) = tensors["step"]
    assert step_control[:3].tolist() == [0.0, 1.0, 1.0] and step_control[3].isnan()  # step, total, scale, no clip
    for args in tensors.values():
        for tensor in args:
            assert not (tensor.shape == ids.shape and (torch.equal(tensor, ids) or torch.equal(tensor, labels)))
