"""P-tuning v2 (``peft.method=ptuning_v2``) through the split: the same model as the whole one.

The client's prefix encoder makes every block's key/value prefix; the server's part crosses the
link. In one process (the real link code against a local ``MiddleServer``); in a real
federation: the 1-client federation == centralized test below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from flglm.client.decoding import generate
from flglm.client.lm import FullCausalLM
from flglm.config import GenerationConfig, RunConfig
from flglm.models import build_full_model
from flglm.models.prefix import PREFIX_MODULE
from tests.test_split import EXACT, _padded_batch, _positions, _split_lm, assert_base_unchanged, snapshot, train_steps

PTUNING = ("peft.method=ptuning_v2", "peft.prefix_length=5")


def _whole(cfg: RunConfig, lm: Any) -> FullCausalLM:
    """The whole model with the client's (identically seeded) prefix encoder."""
    full = FullCausalLM(build_full_model(cfg.model, cfg.peft))
    own = dict(full.hf.named_parameters())
    for name, param in lm.blocks.hf.named_parameters():
        assert torch.equal(param, own[name]), name
    return full


@pytest.mark.parametrize("arch", ["glm", "llama", "gpt2"])
@pytest.mark.parametrize("projection", [False, True], ids=["direct", "projected"])
def test_split_with_prefixes_equals_the_whole_model(
    arch: str, projection: bool, tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    cfg = make_run_config(tiny_model_configs[arch], *PTUNING, f"peft.prefix_projection={projection}", "peft.prefix_hidden_size=32")
    lm, server = _split_lm(cfg)
    full = _whole(cfg, lm)
    ids, mask = _padded_batch()
    split_logits = lm(ids, mask)
    full_logits = full(ids, mask, _positions(mask))
    torch.testing.assert_close(split_logits, full_logits, **EXACT)
    weight = torch.randn(full_logits.shape, generator=torch.Generator().manual_seed(1)) * mask.unsqueeze(-1)
    (split_logits * weight).sum().backward()
    (full_logits * weight).sum().backward()

    full_params = dict(full.hf.named_parameters())
    trainable = [(n, p) for n, p in lm.blocks.hf.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(PREFIX_MODULE + ".") for n, _ in trainable)
    for name, param in trainable:  # the server's prefixes' gradient came back over the link
        torch.testing.assert_close(param.grad, full_params[name].grad, **EXACT, msg=name)
    assert not any(p.requires_grad for p in server.middle.parameters())  # the server trains nothing
    assert server.pending_count() == 0
    server.close()


def test_training_changes_only_the_prefix_encoder(
    tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    cfg = make_run_config(tiny_model_configs["glm"], *PTUNING)
    lm, server = _split_lm(cfg)
    sides = {"client": lm.blocks.hf, "server": server.middle.hf}
    before = snapshot(sides)
    train_steps(lm, steps=3, lr=1e-2)
    changed = [n for n, p in lm.blocks.hf.named_parameters() if not torch.equal(p, before["client"][n])]
    assert changed and all(n.startswith(PREFIX_MODULE + ".") for n in changed)
    assert_base_unchanged(sides, before, lambda name: name.startswith(PREFIX_MODULE + "."))
    assert lm.blocks.hf_state_dict().keys() == {n for n, _ in lm.blocks.hf.named_parameters() if n.startswith(PREFIX_MODULE)}
    assert server.middle.hf_state_dict() == {}  # the server saves nothing: it has no trainable weights
    server.close()


@pytest.mark.parametrize("arch", ["glm", "llama"])
def test_greedy_generation_with_trained_prefixes_equals_the_whole_model(
    arch: str, tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    cfg = make_run_config({**tiny_model_configs[arch], "initializer_range": 0.2}, *PTUNING)
    lm, server = _split_lm(cfg)
    with torch.no_grad():  # a moved prefix encoder (as after training), identical on both
        for _, param in lm.blocks.hf.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)))
    full = FullCausalLM(build_full_model(cfg.model, cfg.peft))
    full.hf.load_state_dict({**lm.blocks.hf.state_dict(), **server.middle.hf.state_dict()})
    lm.eval()
    full.eval()
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    ids = torch.randint(3, 128, mask.shape, generator=torch.Generator().manual_seed(0)).masked_fill(mask == 0, 0)
    settings = GenerationConfig(max_new_tokens=16)
    out = generate(lm, ids, mask, cfg=settings, eos_token_id=2, pad_token_id=0)
    reference = generate(full, ids, mask, cfg=settings, eos_token_id=2, pad_token_id=0)
    assert torch.equal(out, reference), (out, reference)
    # ... and the whole model's own incremental decoding agrees with recomputing every step.
    for t in range(ids.shape[1], out.shape[1]):
        step_mask = torch.cat([mask, torch.ones(2, t - ids.shape[1], dtype=torch.int64)], 1)
        positions = (step_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = full(out[:, :t], step_mask, positions)[:, -1]
        assert torch.equal(logits.argmax(-1), out[:, t]), t
    assert server.decode_sessions() == 0
    server.close()


@pytest.mark.multiprocess
def test_one_client_ptuning_federation_equals_centralized_training(tmp_path) -> None:
    """torchrun, RPC, encryption, secure-aggregation path: the prefixes' gradients cross the real link."""
    from flglm.export import export_run
    from flglm.tensor_files import load_tensors
    from tests.test_federation import federated_and_centralized, merged_weights, write_config

    config = write_config(tmp_path, peft={"method": "ptuning_v2", "prefix_length": 4}, optim={"lr": 0.02})
    fed, central = federated_and_centralized(tmp_path, config)
    assert fed["losses"] == pytest.approx(central["losses"], abs=1e-5)
    fed_weights = merged_weights(tmp_path / "fed")  # the server saved nothing, the client its prefix encoder
    central_weights = load_tensors(tmp_path / "central" / "centralized" / "model.safetensors")
    assert sorted(fed_weights) == sorted(central_weights) and all(n.startswith(PREFIX_MODULE) for n in fed_weights)
    for name, value in central_weights.items():
        torch.testing.assert_close(fed_weights[name], value, atol=1e-5, rtol=0, msg=name)
    with pytest.raises(ValueError, match="P-tuning v2"):
        export_run(tmp_path / "fed", tmp_path / "exported")


@pytest.mark.multiprocess
def test_client_batching_with_prefixes_trains_exactly_as_sequential_serving(tmp_path) -> None:
    """Two P-tuning clients whose requests the server gathers into one batch (each row with its
    own client's prefixes) train as when the server serves them one at a time: the server's
    blocks are frozen, so each client's losses and prefix encoder depend only on its own rows."""
    import json

    from flglm.jobs.subprocesses import run_federation
    from flglm.tensor_files import load_tensors
    from tests.test_federation import write_config

    runs = {}
    for mode in ("sequential", "client_batching"):
        config = write_config(
            tmp_path / mode,
            peft={"method": "ptuning_v2", "prefix_length": 4},
            optim={"lr": 0.02},
            federation={"aggregate_every": 4},
            server={"parallelism": mode, "batch_window_ms": 2000},
            trainer={"max_steps": 8},
        )
        run_federation(config, num_clients=2, run_dir=tmp_path / mode / "run", timeout_s=240)
        runs[mode] = tmp_path / mode / "run"

    server = json.loads((runs["client_batching"] / "summary.json").read_text())["server"]
    assert server["groups"] == 8 and server["mean_group_size"] == 2.0 and server["dropped_members"] == 0
    for client in (0, 1):
        losses = {m: json.loads((d / f"client{client}" / "metrics.json").read_text())["losses"] for m, d in runs.items()}
        assert len(losses["sequential"]) == 8
        assert losses["client_batching"] == pytest.approx(losses["sequential"], abs=1e-5)
        weights = {m: load_tensors(d / f"client{client}" / "client_blocks.safetensors") for m, d in runs.items()}
        assert sorted(weights["sequential"]) == sorted(weights["client_batching"])
        for name, value in weights["sequential"].items():
            torch.testing.assert_close(weights["client_batching"][name], value, atol=1e-5, rtol=0, msg=name)


def test_saved_prefix_encoder_loaded_onto_the_base_reproduces_the_outputs(
    tmp_path, tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    """What a run saves (the prefix encoder only) and ``flglm generate`` loads: same logits as the trained model."""
    from flglm.jobs.generate import load_trained
    from flglm.models import ClientBlocks
    from flglm.models.split import plan_for
    from flglm.tensor_files import save_tensors

    cfg = make_run_config(tiny_model_configs["llama"], *PTUNING)
    lm, server = _split_lm(cfg)
    with torch.no_grad():
        for param in lm.blocks.hf.parameters():
            if param.requires_grad:
                param.mul_(-0.5)  # as if trained
    path = save_tensors(lm.blocks.hf_state_dict(), tmp_path / "client_blocks.safetensors")
    fresh = ClientBlocks(cfg.model, plan_for(cfg.model, cfg.split), cfg.peft)
    ids, mask = _padded_batch()
    with torch.no_grad():
        before = lm(ids, mask)
        lm.blocks = fresh
        assert not torch.equal(lm(ids, mask), before)
        load_trained(fresh.hf, path)
        torch.testing.assert_close(lm(ids, mask), before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="does not hold this side's weights"):
        load_trained(server.middle.hf, path)
    server.close()
