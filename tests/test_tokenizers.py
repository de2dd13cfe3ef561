"""Byte-level tokenizers (issue 18): exact round trips in every script, no unknown tokens, the
same special tokens as the word tokenizer, one vocabulary for all clients (``flglm tokenizer``),
and a warning when a dataset is mostly ``[UNK]``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TINY_MODEL_CONFIGS
from hypothesis import given, settings
from hypothesis import strategies as st

from flglm.cli import main as cli_main
from flglm.config import ConfigError, RunConfig
from flglm.data import (
    SPECIAL_TOKENS,
    byte_vocabulary_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_fingerprint,
    train_byte_bpe_tokenizer,
    train_word_tokenizer,
)
from flglm.data.loading import all_train_examples, build_tokenizer, dev_examples
from flglm.data.unknown_tokens import unknown_token_counts, warn_if_many_unknown
from flglm.jobs.train import warn_unknown_tokens
from flglm.tasks import PromptCollator
from flglm.tasks.classification import PromptError

ROUND_TRIP_TEXTS: dict[str, str] = {
    "chinese": "高血压患者每天应该吃多少盐？建议每天不超过5克。",
    "japanese": "東京都の天気は晴れです。カタカナとひらがな、漢字。",
    "korean": "안녕하세요, 세계!",
    "emoji": "I ❤️ this 👩‍👩‍👧‍👦 🎉🎉",
    "code": 'def f(x: int) -> int:\n\treturn x ** 2  # "quoted" {braces}\n',
    "english": "The Movie was GREAT.\nSecond line,  two spaces;\n\n\tand a tab. MiXeD CaSe!",
    "whitespace": "  leading and trailing  \r\n",
}

CORPUS: list[str] = [*ROUND_TRIP_TEXTS.values(), "高血压的常见症状是头痛。", "糖尿病的常见症状是口渴。"] * 10


def _byte_bpe() -> object:
    return train_byte_bpe_tokenizer(CORPUS, vocab_size=400)


KINDS: dict[str, Callable[[], object]] = {"byte_bpe": _byte_bpe, "bytes": byte_vocabulary_tokenizer}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", sorted(ROUND_TRIP_TEXTS))
def test_byte_tokenizers_round_trip_every_script_exactly_without_unknown_tokens(kind: str, name: str) -> None:
    # Prepare
    tokenizer = KINDS[kind]()
    text = ROUND_TRIP_TEXTS[name]

    # Execute
    ids = tokenizer(text)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)

    # Assert: BOS first, every other id a real token, and the text back byte for byte.
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert decoded == text
    assert unknown_token_counts(tokenizer, [text])[0] == 0


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_word_tokenizer_loses_what_the_byte_tokenizers_keep(kind: str) -> None:
    # The finding, as a contrast: trained on English, the word tokenizer maps Chinese to
    # [UNK] and lower-cases; a byte tokenizer trained on the same English keeps both.
    english = [ROUND_TRIP_TEXTS["english"]] * 5
    word = train_word_tokenizer(english, vocab_size=40)
    text = ROUND_TRIP_TEXTS["chinese"] + " " + ROUND_TRIP_TEXTS["english"]
    unknown, _ = unknown_token_counts(word, [text])
    assert unknown > 0 and word.decode(word(text)["input_ids"], skip_special_tokens=True) != text
    tokenizer = train_byte_bpe_tokenizer(english, vocab_size=300) if kind == "byte_bpe" else byte_vocabulary_tokenizer()
    assert unknown_token_counts(tokenizer, [text]) == (0, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


_BPE_FOR_PROPERTY = train_byte_bpe_tokenizer(CORPUS, vocab_size=400)
_BYTES_FOR_PROPERTY = byte_vocabulary_tokenizer()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_text_round_trips_through_both_byte_tokenizers(text: str) -> None:
    for tokenizer in (_BPE_FOR_PROPERTY, _BYTES_FOR_PROPERTY):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if any(special in text for special in SPECIAL_TOKENS.values()):
            continue  # "[BOS]" in text is the special token, as for the word tokenizer
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("kind", ["word", "byte_bpe", "bytes"])
def test_special_tokens_are_the_same_for_every_kind(kind: str) -> None:
    # Prepare
    tokenizer = {"word": lambda: train_word_tokenizer(CORPUS, vocab_size=60), **KINDS}[kind]()

    # Execute
    batch = tokenizer(["short", "a longer text"], padding=True)
    one = tokenizer("x", add_special_tokens=False)["input_ids"]

    # Assert: pad/bos/eos/unk are ids 0..3 by name, BOS is prepended, padding is on the right,
    # and "[EOS]" in text is one token (as every task relies on).
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [0, 1, 2, 3]
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(4)] == list(SPECIAL_TOKENS.values())
    assert all(row[0] == 1 for row in batch["input_ids"])
    assert batch["attention_mask"][0][-1] == 0 and batch["input_ids"][0][-1] == 0
    assert tokenizer("[EOS]", add_special_tokens=False)["input_ids"] == [2]
    assert len(one) == 1 and tokenizer.decode([1, *one, 2, 0], skip_special_tokens=True) == "x"


def test_the_byte_vocabulary_is_the_specials_then_the_256_bytes_in_order() -> None:
    tokenizer = byte_vocabulary_tokenizer()
    assert len(tokenizer) == 260
    # Every single byte (here as latin-1 characters' UTF-8 encodings checked via raw bytes) maps
    # to id 4 + byte: "A" is byte 65, "é" is bytes C3 A9.
    assert tokenizer("A", add_special_tokens=False)["input_ids"] == [4 + 65]
    assert tokenizer("é", add_special_tokens=False)["input_ids"] == [4 + 0xC3, 4 + 0xA9]
    assert tokenizer("高", add_special_tokens=False)["input_ids"] == [4 + b for b in "高".encode()]


def test_byte_bpe_training_is_deterministic_across_processes_and_survives_save_and_load(tmp_path: Path) -> None:
    # Prepare: the same corpus trained in two fresh processes (hash seeds differ) and here.
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(CORPUS))
    script = (
        "import json,sys; from flglm.data import train_byte_bpe_tokenizer, tokenizer_fingerprint;"
        f"t=train_byte_bpe_tokenizer(json.load(open({str(corpus)!r})), vocab_size=400); print(tokenizer_fingerprint(t))"
    )

    # Execute
    prints = [
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            env={"PYTHONHASHSEED": str(seed), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        ).stdout.strip()
        for seed in (1, 2)
    ]
    here = _byte_bpe()
    loaded = load_tokenizer(save_tokenizer(here, tmp_path / "tok"))

    # Assert
    assert prints[0] == prints[1] == tokenizer_fingerprint(here)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(here)
    text = ROUND_TRIP_TEXTS["chinese"]
    assert loaded(text)["input_ids"] == here(text)["input_ids"] and loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text


def test_the_fingerprint_tells_the_kinds_and_the_merges_apart() -> None:
    bpe_a = train_byte_bpe_tokenizer(CORPUS, vocab_size=400)
    bpe_b = train_byte_bpe_tokenizer(CORPUS[::-1][:7] * 3, vocab_size=400)
    fingerprints = {
        tokenizer_fingerprint(byte_vocabulary_tokenizer()),
        tokenizer_fingerprint(bpe_a),
        tokenizer_fingerprint(bpe_b),
        tokenizer_fingerprint(train_word_tokenizer(CORPUS, vocab_size=400)),
    }
    assert len(fingerprints) == 4
    assert tokenizer_fingerprint(byte_vocabulary_tokenizer()) == tokenizer_fingerprint(byte_vocabulary_tokenizer())


# ------------------------------------------------------------------ from the config


def _jsonl(path: Path, rows: list[dict[str, object]]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def _sentiment_files(tmp_path: Path) -> tuple[str, str]:
    rows = [
        {"sentence": f"this film is {w} 电影{'很好' if i % 2 else '不好'}", "label": i % 2} for i, w in enumerate(["good", "bad", "fine", "dull"] * 4)
    ]
    return _jsonl(tmp_path / "train.jsonl", rows), _jsonl(tmp_path / "dev.jsonl", [{"sentence": "完全不认识的句子 unseen words", "label": 0}] * 4)


def _cfg(make_run_config: Callable[..., RunConfig], tmp_path: Path, *overrides: str) -> RunConfig:
    train, dev = _sentiment_files(tmp_path)
    return make_run_config(
        {**TINY_MODEL_CONFIGS["glm"], "vocab_size": 512},
        f"run_dir={tmp_path / 'run'}",
        f"data.train_path={train}",
        f"data.dev_path={dev}",
        *overrides,
    )


def test_byte_bpe_from_the_config_makes_label_words_single_tokens(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    cfg = _cfg(make_run_config, tmp_path, "data.tokenizer=byte_bpe", "data.tokenizer_vocab_size=300")
    tokenizer = build_tokenizer(cfg, save=True)
    collate = PromptCollator(tokenizer, "{text} sentiment :", ["negative", "positive"], max_length=64)
    assert len(set(collate.label_token_ids)) == 2 and 3 not in collate.label_token_ids
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "run" / "tokenizer")) == tokenizer_fingerprint(tokenizer)
    text = "the word positive, positively, in 中文 positive"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_bytes_from_the_config_needs_no_training_and_label_words_fail_clearly(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    # partition=none: no shared training file, which a byte vocabulary does not need.
    cfg = _cfg(make_run_config, tmp_path, "data.tokenizer=bytes", "data.partition=none")
    tokenizer = build_tokenizer(cfg, save=False)
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(byte_vocabulary_tokenizer())
    with pytest.raises(PromptError, match=r"label word 'negative' must be exactly one known token.*data.tokenizer=bytes"):
        PromptCollator(tokenizer, "{text} sentiment :", ["negative", "positive"], max_length=64)


def test_a_byte_bpe_vocabulary_too_small_for_the_bytes_is_a_config_error(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.tokenizer_vocab_size=100 is too small for data.tokenizer=byte_bpe"):
        _cfg(make_run_config, tmp_path, "data.tokenizer=byte_bpe", "data.tokenizer_vocab_size=100")
    with pytest.raises(ConfigError, match="data.tokenizer"):
        _cfg(make_run_config, tmp_path, "data.tokenizer=sentencepiece")


# ------------------------------------------------------------ flglm tokenizer


def test_flglm_tokenizer_builds_one_vocabulary_from_public_text_that_the_config_then_uses(
    make_run_config: Callable[..., RunConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: public text (a .txt and a .jsonl) that is not the clients' training file.
    lines = [
        "高血压的常见症状是头痛。",
        "糖尿病的常见症状是口渴。",
        ROUND_TRIP_TEXTS["chinese"],
        ROUND_TRIP_TEXTS["japanese"],
        "The Movie was GREAT.",
    ]
    public_txt = tmp_path / "public.txt"
    public_txt.write_text("\n".join(lines) + "\n", encoding="utf-8")
    public_jsonl = _jsonl(tmp_path / "public.jsonl", [{"sentence": t} for t in lines])
    out = tmp_path / "shared_tokenizer"

    # Execute
    rc = cli_main(
        [
            "tokenizer",
            "--corpus",
            str(public_txt),
            public_jsonl,
            "--text-field",
            "sentence",
            "--vocab-size",
            "320",
            "--out",
            str(out),
            "--required",
            "negative",
            "positive",
        ]
    )
    printed = capsys.readouterr().out
    cfg = _cfg(make_run_config, tmp_path, f"data.tokenizer_path={out}", "data.tokenizer=byte_bpe")
    used = build_tokenizer(cfg, save=False)

    # Assert: the directory holds the tokenizer, the run loads it (not one trained on its own
    # data), label words are single tokens, text round-trips.
    assert rc == 0 and f"to {out}" in printed
    expected = train_byte_bpe_tokenizer(lines + lines, vocab_size=320, required=["negative", "positive"])
    assert tokenizer_fingerprint(used) == tokenizer_fingerprint(expected)
    assert len(used("positive", add_special_tokens=False)["input_ids"]) == 1
    text = ROUND_TRIP_TEXTS["japanese"]
    assert used.decode(used(text)["input_ids"], skip_special_tokens=True) == text


def test_flglm_tokenizer_bytes_kind_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    public = tmp_path / "p.txt"
    public.write_text("anything\n")
    assert cli_main(["tokenizer", "--corpus", str(public), "--out", str(tmp_path / "b"), "--kind", "bytes"]) == 0
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "b")) == tokenizer_fingerprint(byte_vocabulary_tokenizer())
    capsys.readouterr()
    assert cli_main(["tokenizer", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "c")]) == 2
    assert f"corpus file not found: {tmp_path / 'missing.txt'}" in capsys.readouterr().err
    assert cli_main(["tokenizer", "--corpus", str(public), "--out", str(tmp_path / "d"), "--vocab-size", "100"]) == 2
    assert "vocab_size must be at least 260" in capsys.readouterr().err


# ----------------------------------------------------------- the [UNK] warning


def test_more_than_one_percent_unknown_tokens_is_warned_once_with_the_share_and_the_file(
    make_run_config: Callable[..., RunConfig], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a word tokenizer trained on the training file; the dev file's words are unseen.
    cfg = _cfg(make_run_config, tmp_path, "data.tokenizer_vocab_size=60")
    tokenizer = build_tokenizer(cfg, save=False)
    train, dev = all_train_examples(cfg), dev_examples(cfg)
    unknown, total = unknown_token_counts(tokenizer, [e.text for e in dev])
    assert total > 0 and unknown / total > 0.01

    # Execute
    with caplog.at_level(logging.WARNING, logger="flglm"):
        warn_unknown_tokens(cfg, tokenizer, train, dev, train_file=cfg.data.train_path)

    # Assert: one warning, for the dev file only, with its share.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"{100 * unknown / total:.1f}% of the tokens of {cfg.data.dev_path} are unknown" in warnings[0]
    assert f"{unknown} of {total}" in warnings[0]


def test_no_warning_at_or_below_one_percent_nor_for_byte_tokenizers(caplog: pytest.LogCaptureFixture) -> None:
    word = train_word_tokenizer(["a b c d e f g h i j"], vocab_size=20)
    texts = ["a b c d e f g h i j " * 10 + "zzz"]  # 1 unknown of 101 tokens: 0.99%
    with caplog.at_level(logging.WARNING, logger="flglm"):
        share = warn_if_many_unknown(word, texts, source="x.tsv")
        assert warn_if_many_unknown(byte_vocabulary_tokenizer(), [ROUND_TRIP_TEXTS["chinese"]], source="y.tsv") == 0.0
        assert warn_if_many_unknown(word, ["zzz a"], source="z.tsv") == 0.5
    assert share == pytest.approx(1 / 101)
    assert [r.getMessage()[:40] for r in caplog.records] == ["50.0% of the tokens of z.tsv are unknown"]
