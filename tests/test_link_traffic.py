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


def _one_step(*, fold: bool, seed: int = 0) -> tuple[list[str], dict[str, torch.Tensor], MiddleServer]:
    """One training step of a 4-layer split, with the server's step folded into the backward or not."""
    torch.manual_seed(seed)
    cfg = RunConfig()
    cfg.model = ModelConfig(config=dict(TINY_MODEL_CONFIGS["llama"]))
    server = MiddleServer(cfg)
    server.initial = {n: p.detach().clone() for n, p in server.compute.middle.named_parameters()}
    link = RecordingLink(ServerEndpoint(server), client_id=0, timeout_s=10, fold_steps=fold)
    info = link.hello(fingerprint(cfg), "tok")
    lm = SplitCausalLM(ClientBlocks(cfg.model, plan_split(4, client_head_layers=1, client_tail_layers=1)), RemoteMiddle(link, server_info=info))
    ids = torch.randint(3, 128, (2, 8))
    link.arm_step(client_step=0, total_steps=3)
    logits = lm(ids, torch.ones_like(ids))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(3, 128, (2, 8)).flatten()).backward()
    link.step(client_step=0, total_steps=3)
    names = [name for name, _ in link.calls[1:]]
    return names, {n: p.detach().clone() for n, p in server.compute.middle.named_parameters()}, server


def test_a_folded_step_is_two_messages_and_steps_the_server_exactly_as_a_separate_step() -> None:
    folded_names, folded, folded_server = _one_step(fold=True)
    plain_names, plain, _ = _one_step(fold=False)

    assert folded_names == ["forward", "backward_step"]
    assert plain_names == ["forward", "backward", "step"]
    assert folded_server.compute.stats.steps == 1
    assert folded.keys() == plain.keys()
    for name in plain:
        assert torch.equal(folded[name], plain[name]), name
    assert any(not torch.equal(folded[n], folded_server.initial[n]) for n in folded)  # the step did step
