"""Tests for the SuperGLUE and summarization task readers (flglm.data.superglue, .summarization)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flglm.data import (
    SUPERGLUE_TASKS,
    TASK_FORMATS,
    DataFormatError,
    Example,
    read_summarization,
    read_task_file,
)

# One or two lines per task in the official SuperGLUE v2 JSON-lines layout.
BOOLQ = [
    {
        "question": "is a tomato a fruit",
        "passage": "Tomato -- The tomato is the edible berry of the plant Solanum lycopersicum.",
        "idx": 0,
        "label": True,
    },
    {"question": "can penguins fly?", "passage": "Penguins are flightless birds.", "idx": 1, "label": False},
]
CB = [
    {"premise": "It was raining. She said the roads were wet.", "hypothesis": "the roads were wet", "label": "entailment", "idx": 0},
    {"premise": "He never left the house.", "hypothesis": "he went to work", "label": "contradiction", "idx": 1},
    {"premise": "I doubt they will come.", "hypothesis": "they will come", "label": "neutral", "idx": 2},
]
COPA = [
    {
        "premise": "My body cast a shadow over the grass.",
        "choice1": "The sun was rising.",
        "choice2": "The grass was cut.",
        "question": "cause",
        "idx": 0,
        "label": 0,
    },
    {
        "premise": "The man broke his toe.",
        "choice1": "He got a hole in his sock.",
        "choice2": "He dropped a hammer on his foot.",
        "question": "effect",
        "idx": 1,
        "label": 1,
    },
]
MULTIRC = [
    {
        "idx": 0,
        "version": 1.1,
        "passage": {
            "text": "<b>Sent 1: </b>Susan wanted a party.<br><b>Sent 2: </b>Five friends came.<br>",
            "questions": [
                {
                    "question": "Who came to the party?",
                    "sentences_used": [1, 2],
                    "answers": [{"text": "Five friends", "idx": 0, "label": 1}, {"text": "Nobody", "idx": 1, "label": 0}],
                    "idx": 0,
                    "multisent": True,
                }
            ],
        },
    }
]
_RECORD_TEXT = "Mars rover built by Nasa lands.\n@highlight\nNasa celebrates\n@highlight\nThe rover is called Curiosity"
RECORD = [
    {
        "source": "Daily mail",
        "passage": {
            "text": _RECORD_TEXT,
            "entities": [{"start": 20, "end": 23}, {"start": 43, "end": 46}, {"start": 90, "end": 98}],
        },
        "qas": [
            {
                "query": "@placeholder sent the rover to Mars.",
                "answers": [{"start": 20, "end": 23, "text": "Nasa"}, {"start": 43, "end": 46, "text": "Nasa"}],
                "idx": 0,
            }
        ],
        "idx": 0,
    }
]
RTE = [
    {"premise": "Dana Reeve died at 44.", "hypothesis": "Dana Reeve is dead.", "label": "entailment", "idx": 0},
    {"premise": "Oil prices fell.", "hypothesis": "Oil prices rose.", "label": "not_entailment", "idx": 1},
]
WIC = [
    {
        "word": "place",
        "sentence1": "Do you want to come over to my place later?",
        "sentence2": "A political system with no place for the less prominent groups.",
        "idx": 0,
        "label": False,
        "start1": 31,
        "start2": 27,
        "end1": 36,
        "end2": 32,
        "version": 1.1,
    }
]
WSC = [
    {
        "text": "Mark told Pete many lies about himself, which Pete included in his book. He should have been more skeptical.",
        "target": {"span1_index": 0, "span1_text": "Mark", "span2_index": 13, "span2_text": "He"},
        "idx": 0,
        "label": False,
    }
]
LINES: dict[str, list[dict[str, Any]]] = {
    "boolq": BOOLQ,
    "cb": CB,
    "copa": COPA,
    "multirc": MULTIRC,
    "record": RECORD,
    "rte": RTE,
    "wic": WIC,
    "wsc": WSC,
}

_RECORD_CONTEXT = "Mars rover built by Nasa lands. Nasa celebrates. The rover is called Curiosity."
_RECORD_TAIL = "sent the rover to Mars. is the statement true? answer:"
_MULTIRC_HEAD = "Susan wanted a party. Five friends came. question: Who came to the party? candidate answer:"
EXPECTED: dict[str, list[Example]] = {
    "boolq": [
        Example(
            "Tomato -- The tomato is the edible berry of the plant Solanum lycopersicum. question: is a tomato a fruit? answer:",
            1,
        ),
        Example("Penguins are flightless birds. question: can penguins fly? answer:", 0),
    ],
    "cb": [
        Example("It was raining. She said the roads were wet. question: the roads were wet yes, no, or maybe? answer:", 0),
        Example("He never left the house. question: he went to work yes, no, or maybe? answer:", 1),
        Example("I doubt they will come. question: they will come yes, no, or maybe? answer:", 2),
    ],
    "copa": [
        Example(
            "My body cast a shadow over the grass. what was the cause? option one: The sun was rising. option two: The grass was cut. answer:",
            0,
        ),
        Example(
            "The man broke his toe. what happened as a result? "
            "option one: He got a hole in his sock. option two: He dropped a hammer on his foot. answer:",
            1,
        ),
    ],
    "multirc": [
        Example(f"{_MULTIRC_HEAD} Five friends is the candidate answer correct? answer:", 1),
        Example(f"{_MULTIRC_HEAD} Nobody is the candidate answer correct? answer:", 0),
    ],
    "record": [
        Example(f"{_RECORD_CONTEXT} statement: Nasa {_RECORD_TAIL}", 1),
        Example(f"{_RECORD_CONTEXT} statement: Curiosity {_RECORD_TAIL}", 0),
    ],
    "rte": [
        Example("Dana Reeve died at 44. question: Dana Reeve is dead. yes or no? answer:", 0),
        Example("Oil prices fell. question: Oil prices rose. yes or no? answer:", 1),
    ],
    "wic": [
        Example(
            "Do you want to come over to my place later? A political system with no place for the less prominent groups. "
            'question: is the word "place" used in the same sense in both sentences? answer:',
            0,
        )
    ],
    "wsc": [
        Example(
            "Mark told Pete many lies about himself, which Pete included in his book. He should have been more skeptical. "
            'question: in the passage above, does "He" refer to "Mark"? answer:',
            0,
        )
    ],
}


def _write_lines(tmp_path: Path, name: str, records: list[Any]) -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _unlabelled(task: str, record: dict[str, Any]) -> dict[str, Any]:
    """The same record as a test-split line: every label removed."""
    record = json.loads(json.dumps(record))
    record.pop("label", None)
    for question in record.get("passage", {}).get("questions", []) if task == "multirc" else []:
        for answer in question["answers"]:
            del answer["label"]
    for qa in record.get("qas", []):
        del qa["answers"]
    return record


# --- SuperGLUE: the examples each task gives --------------------------------------------


@pytest.mark.parametrize("task", sorted(LINES))
def test_superglue_task_gives_expected_examples(tmp_path: Path, task: str) -> None:
    # Prepare
    path = _write_lines(tmp_path, f"{task}.jsonl", LINES[task])
    # Execute
    examples = SUPERGLUE_TASKS[task].read(path)
    # Assert
    assert examples == EXPECTED[task]
    assert read_task_file(path, task) == examples
    assert all(example.target is None for example in examples)


@pytest.mark.parametrize("task", sorted(LINES))
def test_superglue_test_split_reads_unlabelled_with_same_texts(tmp_path: Path, task: str) -> None:
    path = _write_lines(tmp_path, "test.jsonl", [_unlabelled(task, record) for record in LINES[task]])
    examples = read_task_file(path, task, labelled=False)
    assert examples == [Example(example.text) for example in EXPECTED[task]]


def test_superglue_unlabelled_read_ignores_labels_that_are_present(tmp_path: Path) -> None:
    path = _write_lines(tmp_path, "val.jsonl", BOOLQ)
    assert [e.label for e in SUPERGLUE_TASKS["boolq"].read(path, labelled=False)] == [None, None]


def test_superglue_label_words_match_the_classes() -> None:
    words = {name: spec.label_words for name, spec in SUPERGLUE_TASKS.items()}
    assert words == {
        "boolq": ("no", "yes"),
        "cb": ("yes", "no", "maybe"),
        "copa": ("one", "two"),
        "multirc": ("no", "yes"),
        "record": ("no", "yes"),
        "rte": ("yes", "no"),
        "wic": ("no", "yes"),
        "wsc": ("no", "yes"),
    }
    assert SUPERGLUE_TASKS["cb"].label_names == ("entailment", "contradiction", "neutral")
    assert all(len(spec.label_names) == len(spec.label_words) for spec in SUPERGLUE_TASKS.values())
    for example in (e for examples in EXPECTED.values() for e in examples):
        assert example.text.endswith(" answer:")


def test_record_entities_are_inclusive_spans_deduplicated_in_mention_order(tmp_path: Path) -> None:
    record = json.loads(json.dumps(RECORD[0]))
    record["passage"]["entities"].reverse()  # Curiosity first, then Nasa twice
    path = _write_lines(tmp_path, "record.jsonl", [record])
    examples = read_task_file(path, "record")
    assert [e.label for e in examples] == [0, 1]
    assert examples[0].text.endswith("statement: Curiosity sent the rover to Mars. is the statement true? answer:")


def test_blank_lines_are_skipped_and_line_numbers_still_count_them(tmp_path: Path) -> None:
    bad = dict(RTE[1], label="maybe")
    path = _write(tmp_path, "rte.jsonl", json.dumps(RTE[0]) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataFormatError, match=r"rte\.jsonl:3: field 'label' is 'maybe'"):
        read_task_file(path, "rte")


# --- SuperGLUE: errors name the file and the line --------------------------------------------


def _error_cases() -> list[tuple[str, dict[str, Any], str]]:
    multirc_bad_label = json.loads(json.dumps(MULTIRC[0]))
    multirc_bad_label["passage"]["questions"][0]["answers"][1]["label"] = 2
    record_bad_span = json.loads(json.dumps(RECORD[0]))
    record_bad_span["passage"]["entities"].append({"start": 90, "end": 200})
    record_no_placeholder = json.loads(json.dumps(RECORD[0]))
    record_no_placeholder["qas"][0]["query"] = "Nasa sent the rover."
    record_no_answers = json.loads(json.dumps(RECORD[0]))
    del record_no_answers["qas"][0]["answers"]
    wsc_bad_target = json.loads(json.dumps(WSC[0]))
    wsc_bad_target["target"]["span2_index"] = "13"
    return [
        ("boolq", {k: v for k, v in BOOLQ[0].items() if k != "passage"}, r"missing field 'passage'"),
        ("boolq", dict(BOOLQ[0], version=1.1), r"unknown field\(s\) \['version'\] for boolq"),
        ("boolq", dict(BOOLQ[0], label="true"), r"field 'label' is not true or false: 'true'"),
        ("boolq", dict(BOOLQ[0], idx="0"), r"field 'idx' is not an integer: '0'"),
        ("boolq", {k: v for k, v in BOOLQ[0].items() if k != "label"}, r"missing field 'label' \(test-split files .*labelled=False\)"),
        ("cb", dict(CB[0], label="not_entailment"), r"field 'label' is 'not_entailment', expected one of \['entailment'"),
        ("cb", dict(CB[0], premise=None), r"field 'premise' is not a string: None"),
        ("copa", dict(COPA[0], label=2), r"field 'label' is 2, expected 0 or 1"),
        ("copa", dict(COPA[0], label=True), r"field 'label' is not an integer: True"),
        ("copa", dict(COPA[0], question="reason"), r"field 'question' is 'reason', expected one of \['cause', 'effect'\]"),
        ("multirc", multirc_bad_label, r"field 'passage\.questions\[0\]\.answers\[1\]\.label' is 2, expected 0 or 1"),
        ("multirc", dict(MULTIRC[0], passage="text"), r"field 'passage' is not a JSON object"),
        ("record", record_bad_span, r"entity span 'passage\.entities\[3\]' = \[90, 200\] .*outside the passage"),
        ("record", record_no_placeholder, r"field 'qas\[0\]\.query' has no @placeholder"),
        ("record", record_no_answers, r"missing field 'qas\[0\]\.answers' \(test-split"),
        ("record", dict(RECORD[0], qas={"query": "x"}), r"field 'qas' is not a list of JSON objects"),
        ("rte", dict(RTE[0], label=0), r"field 'label' is not a string: 0"),
        ("wic", dict(WIC[0], end1=99), r"span start1=31, end1=99 is outside sentence1 of 43 characters"),
        ("wsc", wsc_bad_target, r"field 'target\.span2_index' is not an integer: '13'"),
        ("wsc", dict(WSC[0], source="x"), r"unknown field\(s\) \['source'\] for wsc"),
    ]


@pytest.mark.parametrize(("task", "bad", "message"), _error_cases())
def test_superglue_bad_line_names_file_and_line(tmp_path: Path, task: str, bad: dict[str, Any], message: str) -> None:
    path = _write_lines(tmp_path, "data.jsonl", [LINES[task][0], bad])
    with pytest.raises(DataFormatError, match=r"data\.jsonl:2: " + message) as caught:
        read_task_file(path, task)
    assert caught.value.line == 2 and caught.value.path == path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "q", "passage": oops}\n', r"bad\.jsonl:1: malformed JSON"),
        ("[1, 2]\n", r"bad\.jsonl:1: expected a JSON object, got list"),
        ("", r"bad\.jsonl: file is empty"),
        ("\n  \n", r"bad\.jsonl: file is empty"),
    ],
)
def test_superglue_malformed_or_empty_file(tmp_path: Path, content: str, message: str) -> None:
    path = _write(tmp_path, "bad.jsonl", content)
    with pytest.raises(DataFormatError, match=message):
        read_task_file(path, "boolq")


def test_superglue_file_without_any_candidates_is_an_error(tmp_path: Path) -> None:
    record = json.loads(json.dumps(RECORD[0]))
    record["passage"]["entities"] = []
    path = _write_lines(tmp_path, "record.jsonl", [record])
    with pytest.raises(DataFormatError, match=r"record\.jsonl: 1 record\(s\) but no examples"):
        read_task_file(path, "record")


def test_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="gone.jsonl"):
        read_task_file(tmp_path / "gone.jsonl", "wic")
    with pytest.raises(FileNotFoundError, match="gone.csv"):
        read_task_file(tmp_path / "gone.csv", "xsum")


def test_unknown_format_lists_the_known_ones(tmp_path: Path) -> None:
    path = _write_lines(tmp_path, "a.jsonl", BOOLQ)
    with pytest.raises(ValueError, match=r"unknown task format 'sst2'; known formats are \['boolq', .*'cnn_dailymail', 'xsum'\]"):
        read_task_file(path, "sst2")
    assert TASK_FORMATS == ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc", "cnn_dailymail", "xsum")


# --- summarization ----------------------------------------------------------------------------

CNN_CSV = (
    "id,article,highlights\n"
    '0001d1afc246a7964130f43ae940af6bc6c57f01,"(CNN) -- The ship, said the captain, ""sank fast"".",'
    '"Ship sank fast .\nCaptain spoke ."\n'
    "0002095e55fcbd3a2f366d9bf92a95433dc305ef,A short second article.,Second summary .\n"
)
CNN_EXPECTED = [
    Example(text='(CNN) -- The ship, said the captain, "sank fast".', target="Ship sank fast .\nCaptain spoke ."),
    Example(text="A short second article.", target="Second summary ."),
]
XSUM_LINES = [
    {"document": "The council approved the plan on Monday.", "summary": "A plan was approved.", "id": "35232142"},
    {"document": "Rain fell across Wales.", "summary": "It rained.", "id": "40143035"},
]
XSUM_EXPECTED = [
    Example(text="The council approved the plan on Monday.", target="A plan was approved."),
    Example(text="Rain fell across Wales.", target="It rained."),
]


def test_cnn_dailymail_csv_with_quoted_multiline_highlights(tmp_path: Path) -> None:
    path = _write(tmp_path, "train.csv", CNN_CSV)
    assert read_task_file(path, "cnn_dailymail") == CNN_EXPECTED


def test_xsum_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl = _write_lines(tmp_path, "xsum.jsonl", XSUM_LINES)
    csv_path = _write(tmp_path, "xsum.csv", "document,summary,id\n" + "".join(f'"{r["document"]}",{r["summary"]},{r["id"]}\n' for r in XSUM_LINES))
    assert read_task_file(jsonl, "xsum") == XSUM_EXPECTED
    assert read_task_file(csv_path, "xsum") == XSUM_EXPECTED


def test_summarization_accepts_plain_article_summary_and_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    path.write_bytes("\ufeffarticle,summary\nSome news.,News.\n".encode())
    assert read_summarization(path) == [Example(text="Some news.", target="News.")]


def test_summarization_unlabelled_has_no_target(tmp_path: Path) -> None:
    no_summary = _write(tmp_path, "test.csv", "id,article\n7,Only the article.\n")
    with_summary = _write_lines(tmp_path, "val.jsonl", XSUM_LINES[:1])
    assert read_task_file(no_summary, "cnn_dailymail", labelled=False) == [Example("Only the article.")]
    assert read_summarization(with_summary, labelled=False) == [Example("The council approved the plan on Monday.")]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        # The bad row starts on line 4: the quoted field of the row before spans lines 2-3.
        ("a.csv", CNN_CSV.replace("A short second article.,", "A short, second article.,"), r"a\.csv:4: expected 3 comma-separated columns"),
        ("a.csv", "id,article,highlights,url\n1,a,b,c\n", r"a\.csv:1: unknown field\(s\) \['url'\]"),
        ("a.csv", "id,article\n1,a\n", r"a\.csv:1: missing field: expected one of \['summary', 'highlights'\]"),
        ("a.csv", "article,article,summary\na,b,c\n", r"a\.csv:1: header repeats a column name"),
        ("a.csv", "", r"a\.csv: file is empty"),
        ("a.csv", "id,article,highlights\n", r"a\.csv: file has no records"),
        ("a.csv", "id,article,highlights\n1," + "x" * 140_000 + ",c\n", r"a\.csv:2: malformed CSV: field larger than field limit"),
        ("a.jsonl", '{"document": "d", "summary": "s"}\n{"document": "d", "summary": 3}\n', r"a\.jsonl:2: field 'summary' is not a string: 3"),
        ("a.jsonl", '{"document": "d", "summary": "s"}\n{"document": "d", "summary": "s"\n', r"a\.jsonl:2: malformed JSON"),
        ("a.jsonl", '{"article": "a", "document": "d", "summary": "s"}\n', r"a\.jsonl:1: ambiguous: both \['article', 'document'\]"),
        ("a.jsonl", '{"summary": "s"}\n', r"a\.jsonl:1: missing field: expected one of \['article', 'document'\]"),
        ("a.jsonl", '{"document": "d", "summary": "s", "title": "t"}\n', r"a\.jsonl:1: unknown field\(s\) \['title'\]"),
        ("a.jsonl", "\n", r"a\.jsonl: file has no records"),
    ],
)
def test_summarization_errors_name_file_and_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = _write(tmp_path, name, content)
    with pytest.raises(DataFormatError, match=message):
        read_task_file(path, "xsum")


def test_summarization_unknown_suffix_lists_supported_ones(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.tsv", "article\tsummary\n")
    with pytest.raises(ValueError, match=r"a\.tsv.*\['\.csv', '\.json', '\.jsonl'\]"):
        read_task_file(path, "cnn_dailymail")
