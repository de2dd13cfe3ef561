"""Every file layout (JSON array, JSON lines, CSV, TSV, plain text) for every task, by config field names.

Issue 18: data had to be rewritten by hand into one layout with fixed names. These tests pin
that each layout yields the same examples, that bad files are named with their line, that
plain text becomes fixed token blocks, and that a centralized run reads every client's file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_MODEL_CONFIGS

from flglm.config import ConfigError, RunConfig
from flglm.data import DataFormatError, Example
from flglm.data.fields import classification_examples
from flglm.data.formats import read_rows
from flglm.data.loading import all_train_examples, build_tokenizer, client_train_examples, dev_examples
from flglm.jobs.train import run_centralized
from flglm.tasks import TextCollator

RECORDS = [
    {"sentence": "a fine film", "label": 1},
    {"sentence": 'it said "no"', "label": 0},
    {"sentence": "tabs, commas and quotes", "label": 1},
]
EXPECTED = [Example("a fine film", 1), Example('it said "no"', 0), Example("tabs, commas and quotes", 1)]


def _write_all_layouts(directory: Path, records: list[dict[str, Any]]) -> dict[str, Path]:
    """The same records as a JSON array, JSON lines, CSV (quoted) and TSV (GLUE, unquoted)."""
    names = list(records[0])
    paths = {ext: directory / f"data.{ext}" for ext in ("json", "jsonl", "csv", "tsv")}
    paths["json"].write_text(json.dumps(records, indent=2))
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in records))

    def quoted(value: Any) -> str:
        return '"' + str(value).replace('"', '""') + '"'

    paths["csv"].write_text(",".join(names) + "\n" + "".join(",".join(quoted(r[n]) for n in names) + "\n" for r in records))
    paths["tsv"].write_text("\t".join(names) + "\n" + "".join("\t".join(str(r[n]) for n in names) + "\n" for r in records))
    return paths


def _config(make_run_config: Callable[..., RunConfig], *overrides: str) -> RunConfig:
    return make_run_config(TINY_MODEL_CONFIGS["glm"], "federation.num_clients=2", *overrides)


# --- round trips ----------------------------------------------------------------------


def test_every_layout_yields_the_same_classification_examples(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    paths = _write_all_layouts(tmp_path, RECORDS)
    for ext, path in paths.items():
        assert classification_examples(read_rows(path), path, text_field="sentence", label_field="label") == EXPECTED, ext
        # The same through the config, with a format forced instead of the suffix.
        cfg = _config(make_run_config, f"data.train_path={path}", "data.partition=none", f"data.format={ext}")
        assert client_train_examples(cfg, 0) == EXPECTED, ext


def test_every_layout_yields_the_same_generation_examples(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    records = [{"question": "what is 2 + 2 ?", "answer": "4"}, {"question": "capital of france ?", "answer": "paris"}]
    expected = [Example(text="what is 2 + 2 ?", target="4"), Example(text="capital of france ?", target="paris")]
    for ext, path in _write_all_layouts(tmp_path, records).items():
        cfg = _config(
            make_run_config, f"data.train_path={path}", "task.kind=generation", "data.prompt_field=question", "data.target_field=answer"
        )
        assert all_train_examples(cfg) == expected, ext


def test_generation_reads_a_json_array_of_question_answer(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"question": "q one", "answer": "a one"}, {"question": "q two", "answer": "a two"}], indent=1))
    cfg = _config(make_run_config, f"data.train_path={path}", "task.kind=generation", "data.prompt_field=question", "data.target_field=answer")
    assert all_train_examples(cfg) == [Example(text="q one", target="a one"), Example(text="q two", target="a two")]
    # Without the field names it is read with the summarization names, and says what it has.
    default = _config(make_run_config, f"data.train_path={path}", "task.kind=generation")
    with pytest.raises(DataFormatError, match=r"qa\.json:2: row 0 has fields \['answer', 'question'\], expected prompt field one of \['article', 'document'\]"):
        all_train_examples(default)


def test_existing_article_summary_files_read_unchanged_with_format_auto(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    path = tmp_path / "xsum.jsonl"
    path.write_text('{"document": "Rain fell.", "summary": "It rained.", "id": "1"}\n{"article": "A.", "highlights": "B."}\n')
    cfg = _config(make_run_config, f"data.train_path={path}", "task.kind=generation")
    assert all_train_examples(cfg) == [Example(text="Rain fell.", target="It rained."), Example(text="A.", target="B.")]


# --- malformed input: each names the file and the line ---------------------------------


@pytest.mark.parametrize(
    ("name", "content", "fmt", "message"),
    [
        ("a.jsonl", '[{"sentence": "x", "label": 1}]', "jsonl", r"a\.jsonl:1: is a JSON array, not JSON lines"),
        ("a.json", '{"sentence": "x", "label": 1}\n', "json", r"a\.json:1: is not a JSON array"),
        ("a.json", '[\n {"sentence": "x", "label": 1},\n {"sentence": oops}\n]', "auto", r"a\.json:3: malformed JSON in row 1"),
        ("a.json", '[\n {"sentence": "x", "label": 1},\n 7\n]', "auto", r"a\.json:3: row 1 is a JSON int, expected an object"),
        ("a.json", '[{"sentence": "x", "label": 1}] [', "auto", r"a\.json:1: extra data after the JSON array"),
        ("a.jsonl", '{"sentence": "x", "label": 1}\n\n{"question": "q", "answer": "a"}\n', "auto",
         r"a\.jsonl:3: row 1 has fields \['answer', 'question'\], expected text field 'sentence'"),
        ("a.csv", "sentence,label\nx,1\ny\n", "auto", r"a\.csv:3: row 1 has 1 comma-separated columns, expected 2"),
        ("a.csv", "question,answer\nq,a\n", "auto", r"a\.csv:2: row 0 has fields \['answer', 'question'\], expected text field 'sentence'"),
        ("a.tsv", "sentence\tlabel\nx\tgood\n", "auto", r"a\.tsv:2: row 0: label field 'label' is str 'good', expected an integer"),
        ("a.jsonl", '{"sentence": 3, "label": 1}\n', "auto", r"a\.jsonl:1: row 0: text field 'sentence' is int 3, expected a string"),
        ("a.jsonl", '{"sentence": "x", "label": 1.5}\n', "auto", r"a\.jsonl:1: row 0: label field 'label' is float 1\.5"),
        ("a.json", " \n", "auto", r"a\.json: file is empty"),
        ("a.jsonl", "", "auto", r"a\.jsonl: file is empty"),
        ("a.csv", "", "auto", r"a\.csv: file is empty"),
        ("a.tsv", "\n\n", "auto", r"a\.tsv: file is empty"),
        ("a.json", "[]", "auto", r"a\.json: file has no records"),
        ("a.csv", "sentence,label\n", "auto", r"a\.csv: file has no records"),
    ],
)
def test_malformed_files_name_file_and_line(
    make_run_config: Callable[..., RunConfig], tmp_path: Path, name: str, content: str, fmt: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    cfg = _config(make_run_config, f"data.train_path={path}", "data.partition=none", f"data.format={fmt}")
    with pytest.raises(DataFormatError, match=message):
        client_train_examples(cfg, 0)


def test_a_jsonl_file_holding_an_array_is_read_as_the_array_it_is(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(RECORDS))
    cfg = _config(make_run_config, f"data.train_path={path}", "data.partition=none")
    assert client_train_examples(cfg, 0) == EXPECTED


@pytest.mark.parametrize(
    ("name", "head", "line"),
    [("a.jsonl", b'{"sentence": "ok", "label": 1}\n{"sentence": "', 2), ("a.csv", b"sentence,label\nok,1\n", 3), ("a.txt", b"one line\nand ", 2)],
)
def test_undecodable_bytes_name_file_line_and_byte_offset(
    make_run_config: Callable[..., RunConfig], tmp_path: Path, name: str, head: bytes, line: int
) -> None:
    path = tmp_path / name
    path.write_bytes(head + b"\xff\n")
    kind = "language_modeling" if name.endswith(".txt") else "classification"
    cfg = _config(make_run_config, f"data.train_path={path}", "data.partition=none", f"task.kind={kind}", "data.tokenizer_path=unused")
    with pytest.raises(DataFormatError, match=rf"a\.\w+:{line}: byte {len(head)} \(0xff\) is not valid UTF-8"):
        client_train_examples(cfg, 0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.prompt_field=question"], r"data.prompt_field='question' is set but task.kind=classification does not read it"),
        (["task.kind=generation", "data.text_field=body"], r"data.text_field='body' is set but task.kind=generation does not read it"),
        (["task.kind=language_modeling", "data.label_field=stars"], r"data.label_field='stars' is set but task.kind=language_modeling"),
        (["task.kind=language_modeling", "data.format=text", "data.text_field=body"], r"data.text_field='body' is set but data.format=text"),
        (["data.format=boolq", "data.text_field=body"], r"data.text_field='body' is set but data.format=boolq does not read it"),
        (["data.format=text"], r"data.format=text \(plain text\) is for task.kind=language_modeling"),
        (["data.train_path=c{client}.jsonl"], r"has a \{client\} placeholder .* data.partition=iid divides one file"),
    ],
)
def test_a_field_setting_the_task_does_not_read_is_an_error(make_run_config: Callable[..., RunConfig], overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(make_run_config, *overrides)


def test_plain_text_for_classification_is_refused_by_name(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("just words\n")
    cfg = _config(make_run_config, f"data.train_path={path}", "data.partition=none")
    with pytest.raises(ConfigError, match=r"notes\.txt is plain text, which only task.kind=language_modeling reads"):
        client_train_examples(cfg, 0)


# --- language modelling on plain text: fixed token blocks -----------------------------

WORDS = [f"w{i}" for i in range(23)]


def test_plain_text_becomes_fixed_blocks_and_the_remainder_is_dropped(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    # Prepare: 23 words over three lines (blank lines between), blocks of 8 tokens.
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(WORDS[:5]) + "\n\n" + " ".join(WORDS[5:17]) + "\n" + " ".join(WORDS[17:]) + "\n")
    cfg = _config(make_run_config, f"data.train_path={path}", "task.kind=language_modeling", "data.max_length=8")

    # Execute
    blocks = all_train_examples(cfg)
    tokenizer = build_tokenizer(cfg, save=False)

    # Assert: 23 // 8 = 2 blocks, lines run on across block edges, the last 7 words are dropped.
    assert len(blocks) == 2
    assert [b.input_ids for b in blocks] == [tuple(tokenizer.convert_tokens_to_ids(WORDS[i : i + 8])) for i in (0, 8)]
    assert [b.text for b in blocks] == [" ".join(WORDS[0:8]), " ".join(WORDS[8:16])]
    assert [client_train_examples(cfg, c) for c in (0, 1)] == [[blocks[0]], [blocks[1]]]  # iid over blocks
    batch = TextCollator(tokenizer, cfg.data.max_length)(blocks)
    assert batch["input_ids"].tolist() == [list(b.input_ids) for b in blocks]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 8]  # no padding: every next token is a target


def test_plain_text_shorter_than_one_block_says_so(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("only three words\n")
    cfg = _config(make_run_config, f"data.train_path={path}", "task.kind=language_modeling", "data.max_length=8")
    with pytest.raises(DataFormatError, match=r"tiny\.txt: has 3 tokens, fewer than one block of data.max_length=8"):
        all_train_examples(cfg)


# --- centralized on the union of the clients' files -----------------------------------


def test_centralized_reads_every_clients_file_in_client_order(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    # Prepare: client 0 has a JSON array, client 1 JSON lines (same suffix template), each its own dev file.
    for client, texts in enumerate((["c0 a", "c0 b", "c0 c"], ["c1 a", "c1 b"])):
        records = [{"sentence": t, "label": i % 2} for i, t in enumerate(texts)]
        body = json.dumps(records) if client == 0 else "".join(json.dumps(r) + "\n" for r in records)
        (tmp_path / f"train{client}.json").write_text(body)
        (tmp_path / f"dev{client}.json").write_text(json.dumps([{"sentence": f"dev {client}", "label": client}]))
    cfg = _config(
        make_run_config,
        f"data.train_path={tmp_path}/train{{client}}.json",
        f"data.dev_path={tmp_path}/dev{{client}}.json",
        "data.partition=none",
    )

    # Execute
    union, per_client = all_train_examples(cfg), [client_train_examples(cfg, c) for c in (0, 1)]

    # Assert
    assert union == per_client[0] + per_client[1]
    assert [e.text for e in union] == ["c0 a", "c0 b", "c0 c", "c1 a", "c1 b"]
    assert dev_examples(cfg) == [Example("dev 0", 0), Example("dev 1", 1)]
    assert dev_examples(cfg, 1) == [Example("dev 1", 1)]
    # max_train_rows cuts each client's file, as each client's own run does.
    capped = _config(make_run_config, f"data.train_path={tmp_path}/train{{client}}.json", "data.partition=none", "data.max_train_rows=1")
    assert [e.text for e in all_train_examples(capped)] == ["c0 a", "c1 a"]


def test_centralized_trains_on_every_clients_own_chinese_file(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    # Prepare: two hospitals' JSON arrays of question/answer pairs, a byte vocabulary (shared, no training).
    for client, rows in enumerate((3, 5)):
        pairs = [{"question": f"第{client}家医院的问题{i}？", "answer": f"回答{i}。"} for i in range(rows)]
        (tmp_path / f"qa{client}.json").write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
    cfg = make_run_config(
        {**TINY_MODEL_CONFIGS["glm"], "vocab_size": 320, "max_position_embeddings": 128},
        "federation.num_clients=2",
        f"run_dir={tmp_path / 'run'}",
        "data.max_length=96",
        f"data.train_path={tmp_path}/qa{{client}}.json",
        f"data.dev_path={tmp_path}/qa{{client}}.json",
        "data.partition=none",
        "data.prompt_field=question",
        "data.target_field=answer",
        "data.tokenizer=bytes",
        "data.shuffle=false",
        "task.kind=generation",
        "task.max_eval_generations=0",
        "data.batch_size=4",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
    )

    # Execute
    metrics = run_centralized(cfg)

    # Assert: one epoch over both files (3 + 5 pairs, batches of 4), validated on both dev files.
    assert metrics["samples"] == 8 and metrics["steps"] == 2
    assert math.isfinite(metrics["val_loss"])
    assert (tmp_path / "run" / "centralized" / "metrics.json").is_file()
    # its config beside its results: what `flglm compare` reads its epochs from
    from flglm.jobs.compare import compare_runs

    (central,) = compare_runs([tmp_path / "run"]).runs
    assert central.kind == "centralized" and central.epochs == 1 and len(central.curves["centralized"]) == 2


def test_centralized_language_modeling_trains_on_text_blocks(make_run_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    # Prepare: a training and a dev text file, cut into 8-token blocks (one dev batch).
    train, dev = tmp_path / "train.txt", tmp_path / "dev.txt"
    train.write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(6)) + "\n")
    dev.write_text(" ".join(WORDS) + "\n" + " ".join(reversed(WORDS)) + "\n")
    cfg = _config(
        make_run_config,
        f"run_dir={tmp_path / 'run'}",
        f"data.train_path={train}",
        f"data.dev_path={dev}",
        "task.kind=language_modeling",
        "data.max_length=8",
        "data.batch_size=4",
        "trainer.max_steps=3",
        "trainer.enable_progress_bar=false",
    )

    # Execute
    metrics = run_centralized(cfg)

    # Assert: 46 dev tokens -> 5 full blocks; 138 training tokens -> 17 blocks, of which iid's equal
    # shares for 2 clients keep 16. No padding, so perplexity is exp of the mean token loss.
    assert len(dev_examples(cfg)) == 5 and len(all_train_examples(cfg)) == 16
    assert math.isfinite(metrics["val_loss"])
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-4)
