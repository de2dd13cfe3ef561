"""Each task type trains through a real Lightning Trainer, and its metrics match an independent count.

Classification and generation train through the split (client blocks + a local ``MiddleServer``,
the link code of a real run); language modeling trains the whole model (the centralized run).
After a few steps the test runs validation and recomputes every logged metric itself: accuracy
and macro-F1 from predictions counted by hand, perplexity from the logits, ROUGE and BLEU from
n-gram counts of the generated texts (formulas written out here, pinned on strings worked out
by hand), not by calling torchmetrics a second time.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL_CONFIGS
from torch.utils.data import DataLoader

from flglm.client.lm import FullCausalLM
from flglm.config import DATA_FORMATS, SUMMARIZATION_FORMATS, SUPERGLUE_FORMATS, ConfigError, OptimConfig, RunConfig, load_config
from flglm.data import SUMMARIZATION_FORMATS as DATA_SUMMARIZATION
from flglm.data import SUPERGLUE_TASKS, TASK_FORMATS, Example
from flglm.data.loading import (
    all_train_examples,
    build_tokenizer,
    dev_examples,
    task_label_words,
    task_prompt,
    truncation_side,
)
from flglm.jobs.train import make_trainer, run_centralized
from flglm.models import build_full_model
from flglm.tasks import (
    ClassificationTask,
    GenerationTask,
    LanguageModelingTask,
    PromptCollator,
    Seq2SeqCollator,
    build_task,
    prompt_rows,
)
from tests.test_split import _split_lm

TOL = {"rel_tol": 0.0, "abs_tol": 1e-5}


# --------------------------------------------------------------------------- helpers


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _config(make_run_config: Callable[..., RunConfig], tmp_path: Path, *overrides: str) -> RunConfig:
    return make_run_config(
        {**TINY_MODEL_CONFIGS["glm"], "initializer_range": 0.2},
        f"run_dir={tmp_path / 'run'}",
        "data.tokenizer_vocab_size=120",
        "data.shuffle=false",
        "optim.lr=0.01",
        "trainer.max_epochs=100",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        *overrides,
    )


def _train_and_validate(cfg: RunConfig, lm: torch.nn.Module, tmp_path: Path) -> tuple[Any, Any, dict[str, float]]:
    """Build the task from the config, fit ``trainer.max_steps`` steps, validate; return
    (module, tokenizer, logged validation metrics)."""
    tokenizer = build_tokenizer(cfg, save=False)
    module, collate = build_task(cfg, lm, tokenizer)
    train = DataLoader(all_train_examples(cfg), batch_size=cfg.data.batch_size, shuffle=False, collate_fn=collate)
    dev = DataLoader(dev_examples(cfg), batch_size=cfg.data.eval_batch_size, shuffle=False, collate_fn=collate)
    trainer = make_trainer(cfg, tmp_path / "out", [])  # CSV logger into tmp_path, as a run logs
    trainer.fit(module, train)
    assert trainer.global_step == cfg.trainer.max_steps
    metrics = {k: float(v) for k, v in trainer.validate(module, dev, verbose=False)[0].items()}
    return module, tokenizer, metrics


def _logits(lm: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits of one unpadded sequence, ``[length, vocab]``."""
    with torch.no_grad():
        return lm(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0].float()


# ---- metrics by hand: the textbook formulas (ROUGE: Lin 2004; BLEU: Papineni et al. 2002)


def _rouge_words(text: str) -> list[str]:
    # ROUGE's usual normalisation: lower case, anything but letters and digits separates words.
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _ngrams(words: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _f_measure(overlap: int, predicted: int, reference: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / reference
    return 2 * precision * recall / (precision + recall)


def _rouge_n(prediction: str, reference: str, n: int) -> float:
    pred, ref = _ngrams(_rouge_words(prediction), n), _ngrams(_rouge_words(reference), n)
    return _f_measure(sum((pred & ref).values()), sum(pred.values()), sum(ref.values()))


def _rouge_l(prediction: str, reference: str) -> float:
    a, b = _rouge_words(prediction), _rouge_words(reference)
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return _f_measure(table[-1][-1], len(a), len(b))


def _bleu(predictions: Sequence[str], references: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU, one reference each, uniform weights, no smoothing, lower-cased words.

    The texts here are lower-case words separated by spaces, where sacreBLEU's 13a tokenizer
    splits nothing further, so splitting on spaces is the same tokenization."""
    matches, totals = [0] * max_n, [0] * max_n
    pred_len = ref_len = 0
    for prediction, reference in zip(predictions, references):
        pred, ref = prediction.lower().split(), reference.lower().split()
        pred_len, ref_len = pred_len + len(pred), ref_len + len(ref)
        for n in range(1, max_n + 1):
            p, r = _ngrams(pred, n), _ngrams(ref, n)
            matches[n - 1] += sum((p & r).values())
            totals[n - 1] += sum(p.values())
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return brevity * math.exp(log_precision)


def test_hand_metrics_on_strings_worked_out_by_hand() -> None:
    # "the cat sat on the mat" vs "the cat lay on a mat": 6 words each.
    # Unigrams in common (clipped): the, cat, on, mat = 4 -> P = R = 4/6 -> F = 2/3.
    # Bigrams: "the cat" only, of 5 each -> F = 1/5. LCS "the cat on mat" = 4 -> F = 2/3.
    pred, ref = "The cat sat on the mat.", "the cat lay on a mat"
    assert math.isclose(_rouge_n(pred, ref, 1), 2 / 3)
    assert math.isclose(_rouge_n(pred, ref, 2), 1 / 5)
    assert math.isclose(_rouge_l(pred, ref), 2 / 3)
    # "the cat sat on the mat" vs "the cat sat on a mat": n-gram precisions 5/6, 3/5, 2/4, 1/3,
    # equal lengths so no brevity penalty: BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** (1/4).
    assert math.isclose(_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]), (1 / 12) ** 0.25)
    # A shorter prediction pays exp(1 - r/c); no 4-gram in common gives 0.
    assert math.isclose(_bleu(["the cat sat on"], ["the cat sat on a mat"]), math.exp(1 - 6 / 4))
    assert _bleu(["the cat sat"], ["the cat sat on a mat"]) == 0.0


def test_generation_task_scores_known_texts_like_the_hand_formulas() -> None:
    # Prepare: the task's metric objects, fed fixed texts (no model run needed).
    module = GenerationTask(torch.nn.Linear(1, 1), optim=OptimConfig(), tokenizer=None)
    predictions = ["the cat sat on the mat", "a dog ran", ""]
    references = ["the cat sat on a mat", "the dog ran home", "nothing at all"]

    # Execute
    module.score_texts(predictions, references)
    rouge, bleu = module.val_rouge.compute(), float(module.val_bleu.compute())

    # Assert: ROUGE is the mean of per-example F, BLEU is one corpus score.
    for key, hand in (("rouge1", lambda p, r: _rouge_n(p, r, 1)), ("rouge2", lambda p, r: _rouge_n(p, r, 2)), ("rougeL", _rouge_l)):
        expected = sum(hand(p, r) for p, r in zip(predictions, references)) / len(predictions)
        assert math.isclose(float(rouge[f"{key}_fmeasure"]), expected, **TOL), key
    assert math.isclose(bleu, _bleu(predictions, references), **TOL)
    assert module.generations == list(zip(predictions, references))


# ------------------------------------------------------------------------ classification

_POSITIVE = ("good", "great", "nice", "fine", "lovely")
_NEGATIVE = ("bad", "awful", "poor", "dull", "ugly")
_FILLER = ("the", "movie", "was", "plot", "very", "and", "acting", "really")


def _sentiment_records(count: int, seed: int) -> list[dict[str, Any]]:
    """Short texts whose label is the sentiment of their one opinion word; both labels alternate."""
    gen = torch.Generator().manual_seed(seed)
    records = []
    for i in range(count):
        label = i % 2
        words = [_FILLER[int(j)] for j in torch.randint(len(_FILLER), (4,), generator=gen)]
        opinion = (_POSITIVE if label else _NEGATIVE)[int(torch.randint(5, (1,), generator=gen))]
        words.insert(int(torch.randint(5, (1,), generator=gen)), opinion)
        records.append({"text": " ".join(words), "label": label})
    return records


def test_classification_accuracy_f1_and_loss_match_predictions_counted_by_hand(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    # Prepare: 32 training and 12 dev texts (one dev batch), through the split.
    train = _write_jsonl(tmp_path / "train.jsonl", _sentiment_records(32, seed=0))
    dev_records = _sentiment_records(12, seed=1)
    dev = _write_jsonl(tmp_path / "dev.jsonl", dev_records)
    cfg = _config(
        make_run_config,
        tmp_path,
        f"data.train_path={train}",
        f"data.dev_path={dev}",
        "data.text_field=text",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        "trainer.max_steps=8",
    )
    lm, _ = _split_lm(cfg)

    # Execute
    module, tokenizer, metrics = _train_and_validate(cfg, lm, tmp_path)

    # Assert: predictions from the LM's logits, one unpadded prompt at a time.
    assert isinstance(module, ClassificationTask)
    words = tokenizer.convert_tokens_to_ids(["negative", "positive"])
    labels = [r["label"] for r in dev_records]
    predictions, losses = [], []
    for record in dev_records:
        ids = tokenizer(f"{record['text']} sentiment :")["input_ids"]  # BOS + words
        scores = _logits(module.lm, ids)[-1, words]
        predictions.append(int(scores.argmax()))
        losses.append(float(-torch.log_softmax(scores, dim=-1)[record["label"]]))
    accuracy = sum(p == y for p, y in zip(predictions, labels)) / len(labels)
    f1 = []
    for c in (0, 1):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels))
        f1.append(2 * tp / (2 * tp + fp + fn))  # both classes occur in the labels: never 0/0
    assert math.isclose(metrics["val_acc"], accuracy, **TOL)
    assert math.isclose(metrics["val_f1"], sum(f1) / 2, **TOL)
    assert math.isclose(metrics["val_loss"], sum(losses) / len(losses), rel_tol=1e-5, abs_tol=1e-5)
    assert len(module.loss_history) == 8


# ---------------------------------------------------------------------- language modeling


def text_token_losses(lm: FullCausalLM, tokenizer: Any, texts: list[str]) -> tuple[float, int]:
    """The summed next-token cross entropy of ``texts`` (one at a time: no padding, no batching)
    from the Hugging Face model's own logits, and the number of predicted tokens."""
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            logits = lm.hf(input_ids=torch.tensor([ids])).logits[0].float()
        total += float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))
        count += len(ids) - 1
    return total, count


def test_language_modeling_perplexity_is_exp_of_the_mean_token_cross_entropy(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    # Prepare: texts of different lengths (so padding is in play), the whole model.
    records = _sentiment_records(24, seed=2)
    for i, record in enumerate(records):
        record["text"] = " ".join(record["text"].split()[: 2 + i % 4])
    train = _write_jsonl(tmp_path / "train.jsonl", records[:16])
    dev = _write_jsonl(tmp_path / "dev.jsonl", records[16:])
    cfg = _config(
        make_run_config,
        tmp_path,
        "task.kind=language_modeling",
        f"data.train_path={train}",
        f"data.dev_path={dev}",
        "data.text_field=text",
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "trainer.max_steps=6",
    )
    lm = FullCausalLM(build_full_model(cfg.model))

    # Execute
    module, tokenizer, metrics = _train_and_validate(cfg, lm, tmp_path)

    # Assert: every next token of every dev text, from the Hugging Face model's own logits.
    assert isinstance(module, LanguageModelingTask)
    total, count = text_token_losses(lm, tokenizer, [r["text"] for r in records[16:]])
    assert math.isclose(metrics["val_ppl"], math.exp(total / count), rel_tol=1e-5)
    assert math.isclose(metrics["val_loss"], total / count, rel_tol=1e-5)  # one dev batch


# ----------------------------------------------------------------------------- generation

_TOPICS = ("rain", "storm", "market", "team", "city", "river", "school", "bridge", "festival", "train")
_VERBS = ("falls", "grows", "closes", "opens", "wins", "floods", "moves", "shines")
_REST = ("today", "after", "a", "long", "week", "in", "the", "north", "south", "again", "people", "said")


def _summary_records(count: int, seed: int, long_every: int = 0) -> list[dict[str, str]]:
    """Articles whose summary is their first two and last two words."""
    gen = torch.Generator().manual_seed(seed)
    records = []
    for i in range(count):
        length = 20 if long_every and i % long_every == long_every - 1 else 6
        words = [_TOPICS[int(torch.randint(len(_TOPICS), (1,), generator=gen))], _VERBS[int(torch.randint(len(_VERBS), (1,), generator=gen))]]
        words += [_REST[int(j)] for j in torch.randint(len(_REST), (length,), generator=gen)]
        records.append({"document": " ".join(words), "summary": " ".join(words[:2] + words[-2:])})
    return records


def test_generation_loss_is_on_the_target_and_rouge_bleu_match_the_generated_texts(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    # Prepare: XSum-layout files; dev = 2 training articles then 4 new ones, the last too long for
    # its budget. Two dev batches of 4; ROUGE/BLEU on the first 4 only (max_eval_generations).
    records = _summary_records(8, seed=0)
    dev_records = records[:2] + _summary_records(4, seed=5, long_every=4)
    every_word = [*_TOPICS, *_VERBS, *_REST]  # so that no dev word is unknown to the tokenizer
    train = _write_jsonl(tmp_path / "train.jsonl", [*records, {"document": " ".join(every_word), "summary": "all words"}])
    dev = _write_jsonl(tmp_path / "dev.jsonl", dev_records)
    cfg = _config(
        make_run_config,
        tmp_path,
        "task.kind=generation",
        "task.prompt='{text} in short'",
        "task.max_target_tokens=6",
        "task.max_eval_generations=4",
        "data.format=xsum",
        f"data.train_path={train}",
        f"data.dev_path={dev}",
        "data.max_length=24",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "trainer.max_steps=20",
    )
    lm, _ = _split_lm(cfg)

    # Execute
    module, tokenizer, metrics = _train_and_validate(cfg, lm, tmp_path)

    # Assert (loss): cross-entropy on the summary tokens and EOS only, token-weighted over both
    # batches; the prompt is BOS + the article cut to 24 - 3 (BOS, "in short") - 6 = 15 words.
    assert isinstance(module, GenerationTask)
    eos = tokenizer.eos_token_id
    total, count, prompts = 0.0, 0, []
    for record in dev_records:
        prompt = tokenizer(" ".join(record["document"].split()[:15]) + " in short")["input_ids"]
        target = tokenizer(record["summary"], add_special_tokens=False)["input_ids"][:5] + [eos]
        logits = _logits(module.lm, prompt + target)
        predicted = logits[len(prompt) - 1 : -1]  # the positions that predict the target tokens
        total += float(F.cross_entropy(predicted, torch.tensor(target), reduction="sum"))
        count += len(target)
        prompts.append(tokenizer.decode(prompt, skip_special_tokens=True))
    assert math.isclose(metrics["val_loss"], total / count, rel_tol=1e-5)

    # Assert (text): the first 4 dev prompts decoded greedily through the split, and their scores.
    generated = module.generate_text(prompts[:4], tokenizer, max_new_tokens=6)
    references = [r["summary"] for r in dev_records[:4]]
    assert module.generations == list(zip(generated, references))
    assert all(re.fullmatch(r"[a-z ]*", text) for text in generated), generated  # see _bleu
    assert metrics["val_rouge1"] > 0, generated  # training reached text worth scoring
    for key, hand in (("rouge1", lambda p, r: _rouge_n(p, r, 1)), ("rouge2", lambda p, r: _rouge_n(p, r, 2)), ("rougeL", _rouge_l)):
        expected = sum(hand(p, r) for p, r in zip(generated, references)) / 4
        assert math.isclose(metrics[f"val_{key}"], expected, **TOL), key
    assert math.isclose(metrics["val_bleu"], _bleu(generated, references), **TOL)


def test_seq2seq_collator_masks_the_prompt_and_cuts_source_and_target_to_their_budgets() -> None:
    # Prepare: a word tokenizer; prompt "{text} in short" = 2 words + BOS; 16 tokens in all,
    # 4 for the target (3 words + EOS), so the source keeps 16 - 3 - 4 = 9 words.
    from flglm.data import train_word_tokenizer

    words = [f"w{i}" for i in range(20)]
    tokenizer = train_word_tokenizer([" ".join(words)], vocab_size=40, required=["in short"])
    collate = Seq2SeqCollator(tokenizer, "{text} in short", max_length=16, max_target_tokens=4)
    ids = tokenizer.convert_tokens_to_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    # Execute
    batch = collate([Example(" ".join(words), target="w1 w2 w3 w4 w5"), Example("w7", target="w8")])

    # Assert: row 0 = BOS + w0..w8 + "in short" + w1 w2 w3 + EOS, exactly max_length.
    prompt0 = [bos, *ids(words[:9]), *ids(["in", "short"])]
    assert batch["input_ids"][0].tolist() == [*prompt0, *ids(["w1", "w2", "w3"]), eos]
    assert batch["labels"][0].tolist() == [-100] * 12 + [*ids(["w1", "w2", "w3"]), eos]
    # Row 1 is short: right-padded, labels -100 on prompt and padding.
    prompt1 = [bos, ids("w7"), *ids(["in", "short"])]
    assert batch["input_ids"][1, :6].tolist() == [*prompt1, ids("w8"), eos]
    assert batch["attention_mask"][1].tolist() == [1] * 6 + [0] * 10
    assert batch["labels"][1].tolist() == [-100] * 4 + [ids("w8"), eos] + [-100] * 10
    # The prompts alone, left-padded for generation; the references as written.
    assert batch["prompt_ids"][0].tolist() == prompt0
    assert batch["prompt_ids"][1, -4:].tolist() == prompt1
    assert batch["prompt_mask"][1].tolist() == [0] * 8 + [1] * 4
    assert batch["references"] == ["w1 w2 w3 w4 w5", "w8"]


@pytest.mark.multiprocess
def test_a_one_client_federation_validates_generation_like_the_centralized_run(tmp_path: Path) -> None:
    # Prepare: a summarization config; torchrun starts a server and one client, encrypted.
    from flglm.crypto.keyring import generate_key_set
    from flglm.jobs.subprocesses import run_federation
    from tests.test_federation import TINY_GLM

    every_word = " ".join([*_TOPICS, *_VERBS, *_REST])
    records = _summary_records(16, seed=0)
    train = _write_jsonl(tmp_path / "train.jsonl", [*records, {"document": every_word, "summary": "all words"}])
    dev = _write_jsonl(tmp_path / "dev.jsonl", records[:6])
    generate_key_set(tmp_path / "keys", num_clients=1)
    config = tmp_path / "config.json"  # JSON is YAML
    config.write_text(
        json.dumps(
            {
                "seed": 1,
                "model": {"config": {**TINY_GLM, "initializer_range": 0.2}},
                "optim": {"lr": 0.01},
                "data": {"train_path": train, "dev_path": dev, "format": "xsum", "max_length": 32, "batch_size": 4, "tokenizer_vocab_size": 200},
                "task": {"kind": "generation", "max_target_tokens": 8, "max_eval_generations": 4},
                "trainer": {"max_epochs": 4, "enable_progress_bar": False},
                "crypto": {"key_dir": str(tmp_path / "keys")},
            }
        )
    )

    # Execute
    run_federation(config, num_clients=1, run_dir=tmp_path / "fed", timeout_s=240)
    central = run_centralized(load_config(config, [f"run_dir={tmp_path / 'central'}"]))

    # Assert: validation decoded through the split (server-side caches) writes what the whole
    # model writes, so every metric agrees; and training got far enough to score something.
    fed = json.loads((tmp_path / "fed" / "client0" / "metrics.json").read_text())["metrics"]
    for key in ("val_loss", "val_rouge1", "val_rouge2", "val_rougeL", "val_bleu"):
        assert math.isclose(fed[key], central[key], rel_tol=1e-4, abs_tol=1e-5), (key, fed[key], central[key])
    assert central["val_rouge1"] > 0


# ------------------------------------------------------------------------------ SuperGLUE


def _boolq_records(count: int, seed: int) -> list[dict[str, Any]]:
    """BoolQ lines whose passages (about 30 words) are longer than the token budget."""
    gen = torch.Generator().manual_seed(seed)
    vocabulary = [*_FILLER, *_TOPICS, *_REST]
    records = []
    for i in range(count):
        passage = " ".join(vocabulary[int(j)] for j in torch.randint(len(vocabulary), (30,), generator=gen))
        topic = _TOPICS[i % len(_TOPICS)]
        records.append({"question": f"is the {topic} open", "passage": f"{passage} {topic}.", "idx": i, "label": i % 3 == 0})
    return records


def test_a_boolq_config_trains_end_to_end_and_long_passages_keep_the_answer_end(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    # Prepare: SuperGLUE BoolQ files, no prompt or label words given, 24 tokens per example.
    train = _write_jsonl(tmp_path / "train.jsonl", _boolq_records(16, seed=0))
    dev = _write_jsonl(tmp_path / "dev.jsonl", _boolq_records(8, seed=1))
    cfg = _config(
        make_run_config,
        tmp_path,
        "data.format=boolq",
        f"data.train_path={train}",
        f"data.dev_path={dev}",
        "data.max_length=24",
        "data.batch_size=4",
        "trainer.max_steps=4",
    )

    # Execute
    metrics = run_centralized(cfg)

    # Assert: the task's own verbalizer and no extra prompt; a full run with its metrics.
    assert task_label_words(cfg) == ["no", "yes"] and task_prompt(cfg) == "{text}"
    assert truncation_side(cfg) == "left"
    assert metrics["steps"] == 4 and {"val_acc", "val_f1", "val_loss", "train_loss"} <= set(metrics)
    assert (tmp_path / "run" / "centralized" / "logs" / "metrics.csv").is_file()
    # Every dev row is cut to 24 tokens from the left: it still ends "question: ...? answer:".
    tokenizer = build_tokenizer(cfg, save=False)
    _, collate = build_task(cfg, FullCausalLM(build_full_model(cfg.model)), tokenizer)
    batch = collate(dev_examples(cfg))
    assert batch["attention_mask"].sum(dim=1).tolist() == [24] * 8
    for row, record in zip(batch["input_ids"], _boolq_records(8, seed=1)):
        tail = tokenizer.decode(row[-9:], skip_special_tokens=True)
        assert tail == f"question : {record['question']} ? answer :", tail
        assert row[0] == tokenizer.bos_token_id


def test_right_truncation_would_lose_the_question_that_left_truncation_keeps() -> None:
    from flglm.data import train_word_tokenizer

    text = "a long passage of many words question : is it ? answer :"
    tokenizer = train_word_tokenizer([text], vocab_size=40, required=["no yes"])
    kept = {}
    for side in ("left", "right"):
        collate = PromptCollator(tokenizer, "{text}", ["no", "yes"], max_length=8, truncation_side=side)
        kept[side] = tokenizer.decode(collate([Example(text, 0)])["input_ids"][0], skip_special_tokens=True)
    assert kept == {"left": "question : is it ? answer :", "right": "a long passage of many words question"}


# --------------------------------------------------------------------------------- config


def test_the_config_knows_the_same_task_formats_as_the_readers() -> None:
    assert SUPERGLUE_FORMATS == tuple(SUPERGLUE_TASKS)
    assert SUMMARIZATION_FORMATS == DATA_SUMMARIZATION
    assert DATA_FORMATS == ("auto", "json", "jsonl", "csv", "tsv", "text", *TASK_FORMATS)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.kind=generation", "data.format=text"], r"task.kind=generation needs \(source, target\) pairs.*'text'"),
        (["data.format=xsum"], r"data.format=xsum gives \(article, summary\) pairs; set task.kind=generation"),
        (["data.format=boolq", "task.kind=language_modeling"], r"data.format=boolq is a classification task"),
        (["data.format=xml"], r"data.format='xml' is not one of \['auto', 'json', 'jsonl', 'csv', 'tsv', 'text', 'boolq'"),
        (["data.truncation_side=middle"], r"data.truncation_side='middle' is not one of"),
        (["task.kind=generation", "data.format=xsum", "task.max_target_tokens=64"], r"task.max_target_tokens must be >= 1 .* data.max_length=64"),
        (["task.kind=generation", "data.format=xsum", "task.max_eval_generations=-1"], r"task.max_eval_generations must be >= 0"),
        (["task.kind=generation", "data.format=xsum", "data.partition=dirichlet"], r"task.kind=generation has none"),
        (["task.kind=generation", "data.format=xsum", "task.prompt=summarize"], r"task.prompt must contain"),
    ],
)
def test_task_and_data_format_must_fit_together(make_run_config: Callable[..., RunConfig], overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_run_config(TINY_MODEL_CONFIGS["glm"], *overrides)


def test_unset_prompt_and_label_words_follow_the_task_and_format(make_run_config: Callable[..., RunConfig]) -> None:
    def resolved(*overrides: str) -> tuple[str, list[str], str]:
        cfg = make_run_config(TINY_MODEL_CONFIGS["glm"], *overrides)
        return task_prompt(cfg), task_label_words(cfg), truncation_side(cfg)

    assert resolved() == ("{text} sentiment :", ["negative", "positive"], "right")
    assert resolved("data.format=cb") == ("{text}", ["yes", "no", "maybe"], "left")
    assert resolved("data.format=cb", "data.truncation_side=right")[2] == "right"
    assert resolved("data.format=rte", "task.label_words=[right,wrong]")[1] == ["right", "wrong"]
    assert resolved("task.kind=generation", "data.format=cnn_dailymail")[0] == "{text} summary :"
    with pytest.raises(ConfigError, match=r"task.label_words=\['a', 'b'\] has 2 words but data.format=cb has 3 classes"):
        resolved("data.format=cb", "task.label_words=[a,b]")


def test_generate_feeds_a_generation_tasks_prompts_as_it_trained_on_them(make_run_config: Callable[..., RunConfig]) -> None:
    # Prepare: a generation task with a template around the question; one question longer than its budget.
    from flglm.data.byte_tokenizers import byte_vocabulary_tokenizer

    model = {**TINY_MODEL_CONFIGS["glm"], "vocab_size": 320, "max_position_embeddings": 128}
    cfg = make_run_config(model, "task.kind=generation", "task.prompt=问：{text} 答：", "data.tokenizer=bytes", "data.max_length=64", "task.max_target_tokens=16")
    tokenizer = byte_vocabulary_tokenizer()
    _, collate = build_task(cfg, FullCausalLM(build_full_model(cfg.model)), tokenizer)
    questions = ["头痛三天了，挂什么科？", "a much longer question " * 8]

    # Execute
    templated, raw = prompt_rows(cfg, tokenizer, questions), prompt_rows(cfg, tokenizer, questions, raw=True)

    # Assert: exactly the prompt ids validation generates from (template, BOS, the source cut to its budget) ...
    batch = collate([Example(text=q, target="好") for q in questions])
    assert templated == [ids[mask.bool()].tolist() for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"])]
    assert tokenizer.decode(templated[0], skip_special_tokens=True) == "问：头痛三天了，挂什么科？ 答："
    # ... and, raw (or for any other task), the text itself after BOS.
    expected_raw = [[tokenizer.bos_token_id, *tokenizer(q, add_special_tokens=False)["input_ids"]] for q in questions]
    assert raw == expected_raw
    assert prompt_rows(make_run_config(model, "data.tokenizer=bytes"), tokenizer, questions) == expected_raw
