"""Pretrained checkpoints as Hugging Face ships them: sharded bf16 safetensors with an index, tied
embeddings, a generation config and a fast tokenizer with a chat template.

Each side of the split reads only the shards and tensors it owns (checked on its loading
record); a LoRA federation fine-tunes such a directory, ``flglm export`` writes one that
``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained`` load, and its logits equal the
trained split model's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

from flglm.config import ConfigError, ModelConfig, load_config
from flglm.data import write_demo_dataset
from flglm.data.chat import chat_prompt
from flglm.data.loading import build_tokenizer
from flglm.models.pretrained import LoadingReport, shard_plan, weight_map
from flglm.models.split import ClientBlocks, MiddleStack, loading_report_of, plan_split
from tests.conftest import TINY_MODEL_CONFIGS

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
SHARD_SIZE = "80KB"
"""About one block (bf16) per shard: several shards, some holding only the server's blocks."""
PLAN = plan_split(4, client_head_layers=1, client_tail_layers=1)
LAYER = re.compile(r"\.layers\.(\d+)\.")


def _model_config(arch: str, *, tie: bool) -> dict[str, Any]:
    return {**TINY_MODEL_CONFIGS[arch], "vocab_size": 256, "tie_word_embeddings": tie}


def _words(paths: list[Path]) -> list[str]:
    words: set[str] = set()
    for path in paths:
        for line in path.read_text().splitlines()[1:]:
            words.update(re.findall(r"\w+|[^\w\s]+", line.split("\t")[-1].lower()))
    return sorted(words | {"sentiment", ":", "negative", "positive"})


def write_tokenizer(directory: Path, words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer built with the ``tokenizers`` library, with a chat template."""
    vocab = {token: i for i, token in enumerate([*SPECIALS, *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side="right"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return tokenizer


def write_pretrained(directory: Path, arch: str, *, tie: bool = False, words: list[str] | None = None) -> Path:
    """A checkpoint directory as Hugging Face ships one: bf16 shards + index, generation config, tokenizer."""
    config = AutoConfig.for_model(**_model_config(arch, tie=tie), torch_dtype="bfloat16")
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=7)
    model.save_pretrained(directory, max_shard_size=SHARD_SIZE)
    write_tokenizer(directory, words or ["the", "movie", "was", "good", "sentiment", ":", "negative", "positive"])
    return directory


def owner(name: str) -> str:
    """Which side holds a tensor of the full model under PLAN."""
    match = LAYER.search(name)
    return "server" if match and int(match.group(1)) in PLAN.middle else "client"


def expected_reads(directory: Path, side: str) -> tuple[set[str], set[str]]:
    """(tensor names, shard files) of the checkpoint that ``side`` owns."""
    mapping = weight_map(directory)
    names = {n for n in mapping if owner(n) == side}
    return names, {mapping[n] for n in names}


def assert_read_only_its_own(report: LoadingReport | dict, directory: Path, side: str) -> None:
    record = report.as_dict() if isinstance(report, LoadingReport) else report
    names, shards = expected_reads(directory, side)
    assert sorted(record["tensors_read"]) == sorted(names), side
    assert len(record["tensors_read"]) == len(set(record["tensors_read"])), f"{side} read a tensor twice"
    assert set(record["shards_opened"]) == shards, side
    assert len(record["shards_opened"]) == len(set(record["shards_opened"])), f"{side} opened a shard twice"
    assert record["checkpoint_dtype"] == "bfloat16"
    other = {shard for n, shard in weight_map(directory).items() if owner(n) != side}
    assert other - shards, f"every shard of the other side is also one of {side}'s: the layout proves nothing"


# ------------------------------------------------------------- shard selection, no processes


def test_shard_plan_picks_the_shards_of_the_named_tensors() -> None:
    mapping = {"a.weight": "s1", "b.weight": "s2", "c.weight": "s2", "d.weight": "s3", "buf": "s3"}

    plan, missing = shard_plan(mapping, ["a.weight", "c.weight", "x.weight"], ["buf", "absent_buffer"])

    assert plan == {"s1": {"a.weight": "a.weight"}, "s2": {"c.weight": "c.weight"}, "s3": {"buf": "buf"}}
    assert missing == ["x.weight"]  # a parameter is required; a buffer only if present


def test_shard_plan_finds_names_stored_without_the_base_prefix() -> None:
    plan, missing = shard_plan({"h.0.attn.c_attn.weight": "s1"}, ["transformer.h.0.attn.c_attn.weight"], [], base_prefix="transformer")

    assert plan == {"s1": {"transformer.h.0.attn.c_attn.weight": "h.0.attn.c_attn.weight"}} and not missing


@pytest.mark.parametrize("arch", ["glm", "llama"])
def test_each_side_opens_only_the_shards_of_its_tensors(arch: str, tmp_path: Path) -> None:
    directory = write_pretrained(tmp_path / arch, arch)
    assert len(set(weight_map(directory).values())) >= 4
    model_cfg = ModelConfig(path=str(directory))

    blocks, middle = ClientBlocks(model_cfg, PLAN), MiddleStack(model_cfg, PLAN)

    assert_read_only_its_own(loading_report_of(blocks.hf), directory, "client")
    assert_read_only_its_own(loading_report_of(middle.hf), directory, "server")
    # bf16 -> float32 is exact: the split computes what the checkpoint computes in float32
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    ids = torch.tensor([[1, 7, 9, 4, 12, 3], [1, 5, 8, 2, 0, 0]])
    mask = (torch.arange(6) < torch.tensor([[6], [4]])).long()
    positions = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        crossing = blocks.input_block(ids, mask)
        crossing.hidden = middle(crossing.hidden, crossing.attention_mask, crossing.position_ids)
        split = blocks.output_block(crossing)
        expected = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert all(p.dtype == torch.float32 for p in [*blocks.parameters(), *middle.parameters()])
    torch.testing.assert_close(split, expected, atol=1e-5, rtol=0)


def test_tied_embeddings_are_read_once_by_the_client_only(tmp_path: Path) -> None:
    directory = write_pretrained(tmp_path / "tied", "llama", tie=True)
    assert "lm_head.weight" not in weight_map(directory)  # save_pretrained leaves the tied head out
    model_cfg = ModelConfig(path=str(directory))

    blocks, middle = ClientBlocks(model_cfg, PLAN), MiddleStack(model_cfg, PLAN)

    client = loading_report_of(blocks.hf)
    assert client.tied_to_embedding == ["lm_head.weight"]
    assert_read_only_its_own(client, directory, "client")
    assert_read_only_its_own(loading_report_of(middle.hf), directory, "server")
    assert blocks.hf.lm_head.weight is blocks.hf.model.embed_tokens.weight
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    torch.testing.assert_close(blocks.hf.lm_head.weight, reference.lm_head.weight, atol=0, rtol=0)


def test_a_missing_shard_or_tensor_is_named(tmp_path: Path) -> None:
    directory = write_pretrained(tmp_path / "broken", "llama")
    mapping = weight_map(directory)
    client_shards = {shard for name, shard in mapping.items() if owner(name) == "client"}
    server_shard = next(shard for shard in sorted(set(mapping.values())) if shard not in client_shards)
    (directory / server_shard).unlink()

    ClientBlocks(ModelConfig(path=str(directory)), PLAN)  # the client never needs that shard
    with pytest.raises(FileNotFoundError, match=server_shard):
        MiddleStack(ModelConfig(path=str(directory)), PLAN)

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.mlp.down_proj.weight"]
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model.layers.2.mlp.down_proj.weight"):
        MiddleStack(ModelConfig(path=str(directory)), PLAN)


# ------------------------------------------------------------------- the model's tokenizer


def _pretrained_run_config(tmp_path: Path, directory: Path, *overrides: str):
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps({"model": {"path": str(directory)}, "data": {"train_path": "unused.tsv"}}))
    return load_config(path, overrides)


def test_the_model_directory_tokenizer_is_used_with_its_special_tokens_and_template(tmp_path: Path) -> None:
    directory = write_pretrained(tmp_path / "m", "glm")
    cfg = _pretrained_run_config(tmp_path, directory, "task.chat_template=true")

    tokenizer = build_tokenizer(cfg, save=False)

    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    prompt = chat_prompt(tokenizer, "{text} sentiment :")
    assert prompt == "<|user|> {text} sentiment : <|assistant|>"  # the template's BOS is left to the collator
    ids = tokenizer(prompt.replace("{text}", "the movie"), add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|user|>") and ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_chat_template_prompts_reach_the_collator(tmp_path: Path) -> None:
    from flglm.client.lm import FullCausalLM
    from flglm.data.readers import Example
    from flglm.models.split import build_full_model
    from flglm.tasks import build_task

    directory = write_pretrained(tmp_path / "m", "llama")
    cfg = _pretrained_run_config(tmp_path, directory, "task.chat_template=true")
    tokenizer = build_tokenizer(cfg, save=False)

    _, collate = build_task(cfg, FullCausalLM(build_full_model(cfg.model)), tokenizer)
    batch = collate([Example(text="the movie was good", label=1)])

    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert tokens == ["<s>", "<|user|>", "the", "movie", "was", "good", "sentiment", ":", "<|assistant|>"]


def test_chat_template_without_a_template_is_a_config_error(tmp_path: Path) -> None:
    directory = write_pretrained(tmp_path / "m", "glm")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    cfg = _pretrained_run_config(tmp_path, directory, "task.chat_template=true")

    with pytest.raises(ConfigError, match=f"model.path={directory}.*no chat template"):
        build_tokenizer(cfg, save=False)


def test_a_model_directory_without_a_tokenizer_is_named(tmp_path: Path) -> None:
    directory = write_pretrained(tmp_path / "m", "glm")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (directory / name).unlink(missing_ok=True)

    with pytest.raises(ConfigError, match=f"model.path={directory} has no tokenizer.*data.tokenizer_path"):
        build_tokenizer(_pretrained_run_config(tmp_path, directory), save=False)


# ------------------------------------------------------- federation -> export -> from_pretrained


def _write_federation_config(tmp_path: Path, directory: Path) -> Path:
    from flglm.crypto.keyring import generate_key_set

    cfg = {
        "seed": 3,
        "model": {"path": str(directory)},
        "peft": {"method": "lora", "lora_r": 4},
        "optim": {"name": "adamw", "lr": 0.05},
        "task": {"kind": "classification", "chat_template": True},
        "data": {"train_path": str(tmp_path / "data" / "train.tsv"), "max_length": 40, "batch_size": 8, "eval_batch_size": 16},
        "trainer": {"max_epochs": 1, "max_steps": 4, "enable_progress_bar": False},
        "crypto": {"key_dir": str(tmp_path / "keys")},
    }
    generate_key_set(tmp_path / "keys", num_clients=1)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.multiprocess
@pytest.mark.parametrize(("arch", "tie"), [("glm", False), ("llama", True)], ids=["glm", "llama-tied"])
def test_lora_federation_on_a_pretrained_checkpoint_exports_what_it_trained(arch: str, tie: bool, tmp_path: Path) -> None:
    from flglm.export import export_run
    from flglm.jobs.generate import load_trained
    from flglm.jobs.subprocesses import run_federation
    from flglm.run_layout import client_weights_path, loading_report_path, middle_weights_path

    # Prepare: a bf16 sharded checkpoint with its tokenizer (chat template) and generation config
    train, _ = write_demo_dataset(tmp_path / "data", train_rows=64, dev_rows=16, seed=1)
    directory = write_pretrained(tmp_path / "pretrained", arch, tie=tie, words=_words([train]))
    config = _write_federation_config(tmp_path, directory)
    fed_dir = tmp_path / "fed"

    # Execute: a real 1-client federation, then export
    run_federation(config, num_clients=1, run_dir=fed_dir, timeout_s=300)
    exported_dir = export_run(fed_dir, tmp_path / "exported")

    # Assert: each side read only its own shards and tensors
    for side, party in (("client", "client0"), ("server", "server")):
        assert_read_only_its_own(json.loads(loading_report_path(fed_dir, party).read_text()), directory, side)
    # the export loads with the stock Auto classes, tokenizer and generation config included
    exported = AutoModelForCausalLM.from_pretrained(exported_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(exported_dir, local_files_only=True)
    base_tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    assert tokenizer.get_vocab() == base_tokenizer.get_vocab()
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    assert chat_prompt(tokenizer, "{text} sentiment :") == chat_prompt(base_tokenizer, "{text} sentiment :")
    assert GenerationConfig.from_pretrained(exported_dir).max_new_tokens == 7
    assert all(p.dtype == torch.float32 for p in exported.parameters())
    assert exported.config.tie_word_embeddings == tie
    # its logits equal the trained split model's, built from the run's saved parts (float32)
    cfg = load_config(fed_dir / "config.yaml")
    blocks, middle = ClientBlocks(cfg.model, PLAN, cfg.peft), MiddleStack(cfg.model, PLAN, cfg.peft)
    load_trained(blocks.hf, client_weights_path(fed_dir, 0))
    load_trained(middle.hf, middle_weights_path(fed_dir))
    texts = [chat_prompt(tokenizer, "{text} sentiment :").replace("{text}", t) for t in ("the movie was dull", "i loved the plot")]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        crossing = blocks.input_block(ids, mask)
        crossing.hidden = middle(crossing.hidden, crossing.attention_mask, crossing.position_ids)
        split = blocks.output_block(crossing)
        got = exported(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        before = base(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], split[valid], atol=1e-5, rtol=0)
    assert (got[valid] - before[valid]).abs().max() > 1e-3, "the LoRA fine-tuning changed nothing"
