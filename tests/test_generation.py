"""Generation through the split: the same tokens as the whole model's Hugging Face ``generate``.

In one process: the client blocks talk to a local ``MiddleServer`` through the real link code
(encrypted and in a real federation: ``tests/test_generate_command.py``). The reference is
``transformers``' own ``generate`` on a whole model holding the same weights, so the caches,
position ids of left-padded prompts and end-of-text handling are checked against it, not
against a second copy of our loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from flglm.client.decoding import GenerationError, generate
from flglm.client.lm import FullCausalLM
from flglm.client.module import SplitClientModule
from flglm.config import GenerationConfig, OptimConfig, RunConfig
from flglm.link.crossing import Crossing
from flglm.link.messages import InvalidMessageError
from flglm.models import build_full_model
from flglm.models.lora import LORA_MARK
from tests.test_split import _split_lm, train_steps

EOS, PAD = 2, 0


def _prompts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of lengths 9, 6 and 3 (pad id 0)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = (9, 6, 3)
    mask = torch.tensor([[0] * (9 - n) + [1] * n for n in lengths], dtype=torch.int64)
    ids = torch.randint(3, 128, mask.shape, generator=gen).masked_fill(mask == 0, PAD)
    return ids, mask


def _config(tiny: dict[str, Any], make_run_config: Callable[..., RunConfig], *overrides: str) -> RunConfig:
    # Larger initial weights than the default 0.02 give peaked, varied next-token choices, so a
    # wrong cache or position shows up as different tokens.
    return make_run_config({**tiny, "initializer_range": 0.2}, *overrides)


def _hf_generate(full: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
    return full.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=EOS, pad_token_id=PAD
    )


@pytest.mark.parametrize("arch", ["glm", "llama", "gpt2"])
@pytest.mark.parametrize("adapter", [False, True], ids=["base", "trained-lora"])
def test_greedy_split_generation_equals_hf_generate(
    arch: str, adapter: bool, tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    overrides = ("peft.method=lora", "peft.lora_r=4") if adapter else ()
    cfg = _config(tiny_model_configs[arch], make_run_config, *overrides)
    lm, server = _split_lm(cfg)
    full = build_full_model(cfg.model, cfg.peft)
    if adapter:
        train_steps(lm, steps=5, lr=5e-2)  # LoRA on both sides moves away from B=0
        trained = {**lm.blocks.hf.state_dict(), **server.middle.hf.state_dict()}
        moved = [n for n, p in full.named_parameters() if LORA_MARK in n and not torch.equal(p, trained[n])]
        assert moved, "training did not change the adapters"
        full.load_state_dict(trained)
    lm.eval()
    full.eval()

    ids, mask = _prompts()
    new = 24
    out = generate(lm, ids, mask, cfg=GenerationConfig(max_new_tokens=new), eos_token_id=EOS, pad_token_id=PAD)
    reference = _hf_generate(full, ids, mask, new)
    assert torch.equal(out, reference), f"split:\n{out[:, 9:]}\nwhole model:\n{reference[:, 9:]}"
    assert len(set(out[:, 9:].flatten().tolist())) > 3, "degenerate output proves little"
    # One crossing for the prompt, then one per new token; the server's cache is freed at the end.
    assert server.stats.decodes == out.shape[1] - ids.shape[1]
    assert server.decode_sessions() == 0
    server.close()


def test_generation_stops_at_end_of_text_and_pads_finished_rows(
    tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    cfg = _config(tiny_model_configs["llama"], make_run_config)
    lm, server = _split_lm(cfg)
    full = build_full_model(cfg.model).eval()
    lm.eval()
    ids, mask = _prompts()
    free = generate(lm, ids, mask, cfg=GenerationConfig(max_new_tokens=12), eos_token_id=None)
    # Declare the token row 0 produces third its end-of-text: row 0 stops there, others go on.
    eos = int(free[0, 9 + 2])
    out = generate(lm, ids, mask, cfg=GenerationConfig(max_new_tokens=12), eos_token_id=eos, pad_token_id=PAD)
    reference = full.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=PAD
    )
    assert torch.equal(out, reference)
    first_eos = (out[0, 9:] == eos).nonzero()[0].item()
    assert (out[0, 9 + first_eos + 1 :] == PAD).all()
    server.close()


def test_sampling_is_seeded_and_the_same_through_the_split(
    tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    cfg = _config(tiny_model_configs["glm"], make_run_config)
    lm, server = _split_lm(cfg)
    whole = FullCausalLM(build_full_model(cfg.model)).eval()
    lm.eval()
    ids, mask = _prompts()
    sampling = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, seed=7)
    first = generate(lm, ids, mask, cfg=sampling)
    assert torch.equal(first, generate(lm, ids, mask, cfg=sampling))
    assert torch.equal(first, generate(whole, ids, mask, cfg=sampling))
    other = generate(lm, ids, mask, cfg=GenerationConfig(**{**sampling.__dict__, "seed": 8}))
    assert not torch.equal(first, other)
    greedy = generate(lm, ids, mask, cfg=GenerationConfig(max_new_tokens=16))
    assert not torch.equal(first, greedy)
    server.close()


def test_task_module_generates_in_eval_mode_and_restores_its_mode(
    tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    cfg = _config(tiny_model_configs["llama"], make_run_config, "generation.max_new_tokens=5")
    lm, server = _split_lm(cfg)
    module = SplitClientModule(lm, optim=OptimConfig(), generation=cfg.generation)
    module.train()
    ids, mask = _prompts()
    out = module.generate(ids, mask)
    assert out.shape == (3, 9 + 5) and module.training
    assert module.generate(ids, mask, max_new_tokens=2).shape == (3, 11)
    server.close()


def test_server_frees_idle_and_surplus_decoding_sessions(
    tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    cfg = _config(tiny_model_configs["llama"], make_run_config, "server.max_decode_sessions_per_client=2")
    lm, server = _split_lm(cfg)
    lm.eval()
    ids, mask = _prompts()
    states = [lm.open_decoding() for _ in range(3)]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for state in states:
            lm.decode(state, ids, mask, pos)
        assert server.decode_sessions() == 2  # the first session was freed for the third
        with pytest.raises(InvalidMessageError, match=r"session 0: the server holds no cache"):
            lm.decode(states[0], ids[:, -1:], torch.cat([mask, mask[:, -1:]], 1), pos[:, -1:] + 1)
        # A request that does not continue the session's cache is refused, naming both lengths.
        with pytest.raises(InvalidMessageError, match=r"continues 4 cached token\(s\) of 3 row\(s\), the server's cache holds 9"):
            lm.link.decode(states[1].session, 4, Crossing(torch.zeros(3, 1, 64), mask[:, :5], pos[:, :1]))
        server.compute.decoding._idle_timeout_s = 0.0  # every session is now idle for too long
        server.compute.decoding.sweep()
    assert server.decode_sessions() == 0
    assert server.summary()["server"]["decode_sessions_evicted"] == 3
    server.close()


def test_leaving_frees_the_clients_sessions(
    tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    cfg = _config(tiny_model_configs["glm"], make_run_config)
    lm, server = _split_lm(cfg)
    ids, mask = _prompts()
    with torch.no_grad():
        lm.decode(lm.open_decoding(), ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
    assert server.decode_sessions() == 1
    lm.link.leave({})
    assert server.decode_sessions() == 0
    server.close()


def test_bad_prompts_get_clear_errors(tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]) -> None:
    cfg = _config(tiny_model_configs["glm"], make_run_config)
    lm, server = _split_lm(cfg)
    ids, mask = _prompts()
    with pytest.raises(GenerationError, match="left-padded"):
        generate(lm, ids.flip(1), mask.flip(1), cfg=GenerationConfig())
    with pytest.raises(GenerationError, match=r"exceeds the model's 64 positions"):
        generate(lm, ids, mask, cfg=GenerationConfig(max_new_tokens=60))
    with pytest.raises(GenerationError, match="int64"):
        generate(lm, ids.float(), mask, cfg=GenerationConfig())
    assert server.decode_sessions() == 0
    server.close()


def test_a_long_prompt_list_is_decoded_in_batches_with_the_same_greedy_tokens(
    tiny_model_configs: dict[str, dict[str, Any]], make_run_config: Callable[..., RunConfig]
) -> None:
    from flglm.data.tokenizer import train_word_tokenizer

    # Prepare: seven prompts of different lengths
    cfg = _config(tiny_model_configs["glm"], make_run_config, "generation.max_new_tokens=6")
    lm, server = _split_lm(cfg)
    words = "the film was good bad long short and very dull fun story actors".split()
    tokenizer = train_word_tokenizer([" ".join(words)] * 3, vocab_size=100, required=[])
    prompts = [" ".join(words[i : i + 1 + i % 4]) for i in range(7)]
    module = SplitClientModule(lm, optim=OptimConfig(), generation=cfg.generation)
    progress: list[tuple[int, int]] = []

    # Execute: all at once, and three at a time
    together = module.generate_with_ids(prompts, tokenizer, batch_size=16)
    batched = module.generate_with_ids(prompts, tokenizer, batch_size=3, on_batch=lambda done, total: progress.append((done, total)))

    # Assert: greedy tokens do not depend on which prompts share a batch
    assert batched == together and len(batched) == 7
    assert sum(len(ids) for _, ids in together) > 7  # not all stopped at once
    assert progress == [(3, 7), (6, 7), (7, 7)]
    assert server.decode_sessions() == 0
    server.close()
