"""Metrics in every language (issue 18): ROUGE/BLEU on Chinese, perplexity = exp of the
token-weighted mean loss, and summary counts as integers.

The reference numbers are computed here from the texts and the logits, with the formulas
written out (character n-grams and LCS for ROUGE), not by calling torchmetrics a second time.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL_CONFIGS
from torchmetrics.text import ROUGEScore

from flglm.client.lm import FullCausalLM
from flglm.config import OptimConfig, RunConfig
from flglm.jobs.summaries import federation_metrics, integer_counts
from flglm.models import build_full_model
from flglm.tasks import GenerationTask, LanguageModelingTask
from flglm.tasks.text_metrics import TextOverlapMetrics, metric_tokens, rouge_normalize
from tests.test_split import _split_lm
from tests.test_tasks import _train_and_validate, text_token_losses

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")

# ---- character-level ROUGE by hand (Lin 2004), the characters ROUGE keeps: no spaces, no punctuation


def _chars(text: str) -> list[str]:
    return [c for c in text.lower() if not c.isspace() and unicodedata.category(c)[0] not in "PS"]


def _f(overlap: int, predicted: int, reference: int) -> float:
    if overlap == 0:
        return 0.0
    p, r = overlap / predicted, overlap / reference
    return 2 * p * r / (p + r)


def _rouge_n(prediction: str, reference: str, n: int) -> float:
    a, b = _chars(prediction), _chars(reference)
    pa = Counter(tuple(a[i : i + n]) for i in range(len(a) - n + 1))
    pb = Counter(tuple(b[i : i + n]) for i in range(len(b) - n + 1))
    return _f(sum((pa & pb).values()), sum(pa.values()), sum(pb.values()))


def _rouge_l(prediction: str, reference: str) -> float:
    a, b = _chars(prediction), _chars(reference)
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return _f(table[-1][-1], len(a), len(b))


HAND = {"rouge1": lambda p, r: _rouge_n(p, r, 1), "rouge2": lambda p, r: _rouge_n(p, r, 2), "rougeL": _rouge_l}


def test_hand_rouge_on_a_pair_worked_out_by_hand() -> None:
    # "高血压的症状" vs "高血压的常见症状。": 6 and 8 characters (the full stop is not one).
    # Common unigrams 6 -> P = 1, R = 6/8 -> F = 12/14. Bigrams 高血 血压 压的 症状 = 4 of 5 and 7.
    assert math.isclose(_rouge_n("高血压的症状", "高血压的常见症状。", 1), 12 / 14)
    assert math.isclose(_rouge_n("高血压的症状", "高血压的常见症状。", 2), _f(4, 5, 7))
    assert math.isclose(_rouge_l("高血压的症状", "高血压的常见症状。"), 12 / 14)


# --------------------------------------------------------------------- identical strings


@pytest.mark.parametrize("kind", ["auto", "char"])
@pytest.mark.parametrize(
    "text",
    [
        "高血压患者每天应该吃多少盐？建议不超过五克。",
        "東京都の天気は晴れです。",
        "안녕하세요 세계 여러분 반갑습니다",
        "The patient, aged 45, reported headaches.",
    ],
)
def test_identical_strings_score_one_in_every_language(kind: str, text: str) -> None:
    metrics = TextOverlapMetrics(kind, rouge_keys=ROUGE_KEYS)
    metrics.update([text], [text])
    scores = {k: float(v) for k, v in metrics.compute(ROUGE_KEYS).items()}
    assert scores == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "bleu": pytest.approx(1.0)}


def test_the_generation_task_scores_identical_chinese_one_by_default_where_torchmetrics_defaults_give_zero() -> None:
    text = "高血压的常见症状是头痛和头晕。"
    module = GenerationTask(torch.nn.Linear(1, 1), optim=OptimConfig(), tokenizer=None)
    module.score_texts([text], [text])
    assert float(module.val_rouge.compute()["rougeL_fmeasure"]) == 1.0 and float(module.val_bleu.compute()) == pytest.approx(1.0)
    # The issue's measurement: torchmetrics' own normalisation leaves no Chinese word at all.
    assert float(ROUGEScore(rouge_keys="rougeL")([text], [[text]])["rougeL_fmeasure"]) == 0.0


def test_auto_tokens_split_cjk_per_character_and_other_text_on_whitespace() -> None:
    assert metric_tokens(rouge_normalize("高血压 Patients 吃盐，每天5克"), "auto") == [
        "高",
        "血",
        "压",
        "patients",
        "吃",
        "盐",
        "每",
        "天",
        "5",
        "克",
    ]
    assert metric_tokens(rouge_normalize("naïve café"), "whitespace") == ["naïve", "café"]


def test_on_english_auto_rouge_is_torchmetrics_default_rouge() -> None:
    # Nothing changes for ASCII text: the same words as torchmetrics' default normalisation.
    predictions = ["The cat sat on the mat.", "a dog, a ball; and (a) game!", "nothing"]
    references = ["the cat lay on a mat", "A dog and a ball", "something else entirely"]
    ours = TextOverlapMetrics("auto", rouge_keys=ROUGE_KEYS)
    ours.update(predictions, references)
    default = ROUGEScore(rouge_keys=ROUGE_KEYS)(predictions, [[r] for r in references])
    for key, value in ours.compute(ROUGE_KEYS).items():
        if key != "bleu":
            assert float(value) == pytest.approx(float(default[f"{key}_fmeasure"]), abs=1e-6), key


def test_model_metric_tokens_are_the_model_tokenizers() -> None:
    from flglm.data import train_byte_bpe_tokenizer

    tokenizer = train_byte_bpe_tokenizer(["高血压的常见症状是头痛"] * 5, vocab_size=300)
    metrics = TextOverlapMetrics("model", rouge_keys=ROUGE_KEYS, tokenizer=tokenizer)
    assert metrics.bleu_text("高血压 头痛") == " ".join(tokenizer.tokenize("高血压 头痛"))
    with pytest.raises(ValueError, match="task.metric_tokenizer must be one of"):
        TextOverlapMetrics("words", rouge_keys=ROUGE_KEYS)


# -------------------------------------------------- Chinese Q&A through the split

_DISEASES = ("高血压", "糖尿病", "感冒", "胃炎", "肺炎", "贫血", "哮喘", "偏头痛")
_SYMPTOMS = ("头晕", "口渴", "发热", "胃痛", "咳嗽", "乏力", "气喘", "头痛")
_ASKS = ("有什么症状", "的症状是什么", "会怎么样")


def _qa_pairs() -> list[dict[str, str]]:
    """Chinese medical questions and answers (XSum layout: document -> summary), 24 pairs."""
    return [{"document": f"请问{d}{ask}", "summary": f"{d}常见{s}。"} for ask in _ASKS for d, s in zip(_DISEASES, _SYMPTOMS)]


def test_chinese_question_answering_trains_through_the_split_and_rouge_is_character_rouge(
    make_run_config: Callable[..., RunConfig], tmp_path: Path
) -> None:
    # Prepare: a byte-level BPE tokenizer trained on the pairs, the model split client/server.
    pairs = _qa_pairs()
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    dev = tmp_path / "dev.jsonl"
    # Dev: two training pairs, then six whose reference names another symptom than training
    # taught, so the scores are partial (neither 0 nor 1) and the comparison can fail.
    shifted = [{"document": f"请问{d}{_ASKS[0]}", "summary": f"{d}常见{_SYMPTOMS[(i + 1) % 8]}。"} for i, d in enumerate(_DISEASES[:6])]
    dev.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs[:2] + shifted), encoding="utf-8")
    cfg = make_run_config(
        {**TINY_MODEL_CONFIGS["glm"], "vocab_size": 384, "initializer_range": 0.2},
        f"run_dir={tmp_path / 'run'}",
        "data.tokenizer=byte_bpe",
        "data.tokenizer_vocab_size=384",
        "data.shuffle=false",
        "data.format=xsum",
        f"data.train_path={train}",
        f"data.dev_path={dev}",
        "data.max_length=40",
        "data.batch_size=8",
        "data.eval_batch_size=4",
        "task.kind=generation",
        "task.prompt='{text}？答：'",
        "task.max_target_tokens=12",
        "task.max_eval_generations=8",
        "optim.lr=0.01",
        "trainer.max_epochs=100",
        "trainer.max_steps=40",
        "trainer.enable_progress_bar=false",
    )
    lm, _ = _split_lm(cfg)

    # Execute
    module, tokenizer, metrics = _train_and_validate(cfg, lm, tmp_path)

    # Assert: no [UNK] in the data; generated texts are Chinese; every logged ROUGE is the
    # character-level ROUGE computed here from the same (generated, reference) pairs.
    for pair in pairs:
        assert tokenizer.unk_token_id not in tokenizer(pair["document"] + pair["summary"])["input_ids"]
    assert len(module.generations) == 8
    generated = [g for g, _ in module.generations]
    assert any(unicodedata.name(c, "").startswith("CJK") for text in generated for c in text), generated
    assert 0.3 < metrics["val_rouge1"] < 1.0 and metrics["val_rouge2"] < 1.0, module.generations  # learnt, and partial
    for key in ROUGE_KEYS:
        expected = sum(HAND[key](g, r) for g, r in module.generations) / len(module.generations)
        assert math.isclose(metrics[f"val_{key}"], expected, rel_tol=0.0, abs_tol=1e-5), (key, module.generations)


# ------------------------------------------------------------------------ perplexity


def test_perplexity_is_exp_of_the_token_weighted_mean_loss_over_the_whole_dev_set(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    # Prepare: dev texts of very different lengths in 3 batches, so a mean of batch means (or of
    # batch perplexities) would differ from the per-token figure.
    texts = [
        "高血压",
        "糖尿病的常见症状是口渴和乏力，需要控制饮食。",
        "感冒",
        "The Patient\nreported headaches and dizziness for two weeks.",
        "胃炎",
        "ok",
        "哮喘患者应避免接触过敏原。",
        "贫血",
    ]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts * 2), encoding="utf-8")
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    cfg = make_run_config(
        {**TINY_MODEL_CONFIGS["glm"], "vocab_size": 320, "max_position_embeddings": 128},
        f"run_dir={tmp_path / 'run'}",
        "task.kind=language_modeling",
        "data.tokenizer=bytes",
        "data.text_field=text",
        "data.shuffle=false",
        "data.max_length=128",
        f"data.train_path={train}",
        f"data.dev_path={dev}",
        "data.batch_size=4",
        "data.eval_batch_size=3",
        "trainer.max_epochs=10",
        "trainer.max_steps=4",
        "trainer.enable_progress_bar=false",
    )
    lm = FullCausalLM(build_full_model(cfg.model))

    # Execute
    module, tokenizer, metrics = _train_and_validate(cfg, lm, tmp_path)

    # Assert: every next token of every dev text, from the Hugging Face model's own logits.
    assert isinstance(module, LanguageModelingTask)
    total, count = text_token_losses(lm, tokenizer, texts)
    batch_means = [loss / n for loss, n in (text_token_losses(lm, tokenizer, [t]) for t in texts)]
    assert math.isclose(metrics["val_loss"], total / count, rel_tol=1e-5)
    assert math.isclose(metrics["val_ppl"], math.exp(total / count), rel_tol=1e-5)
    assert math.isclose(metrics["val_ppl"], math.exp(metrics["val_loss"]), rel_tol=1e-6)
    assert not math.isclose(total / count, sum(batch_means) / len(batch_means), rel_tol=1e-3)  # the test can tell


# ----------------------------------------------------------------- summary counts


def test_federation_counts_are_integers_and_its_perplexity_is_exp_of_its_loss() -> None:
    # Prepare: what the server holds (the link carries every metric as a float).
    clients = {
        "0": {"samples": 600.0, "steps": 38.0, "fedavg_rounds": 408.0, "resent_messages": 1.0, "val_loss": 4.0, "val_ppl": math.exp(4.0)},
        "1": {"samples": 200.0, "steps": 13.0, "fedavg_rounds": 405.0, "resent_messages": 0.0, "val_loss": 6.0, "val_ppl": math.exp(6.0)},
    }

    # Execute
    per_client = {c: integer_counts(m) for c, m in clients.items()}
    federation = federation_metrics(per_client)

    # Assert
    assert per_client["0"]["fedavg_rounds"] == 408 and type(per_client["0"]["fedavg_rounds"]) is int
    assert federation["fedavg_rounds"] == 408 and type(federation["fedavg_rounds"]) is int  # the maximum
    assert federation["samples"] == 800 and federation["steps"] == 51 and federation["resent_messages"] == 1
    assert all(type(federation[k]) is int for k in ("samples", "steps", "resent_messages"))
    assert federation["val_loss"] == pytest.approx((600 * 4.0 + 200 * 6.0) / 800)
    assert federation["val_ppl"] == pytest.approx(math.exp(federation["val_loss"]))
