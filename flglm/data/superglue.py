"""Read the eight SuperGLUE tasks as prompt-filled texts scored by label words.

FL-GLM classifies by letting the LM score one label word per class (a
verbalizer) at the end of a prompt. So every task is flattened here into
``Example(text=<prompt ending where the label word goes>, label=<class index>)``
and each task carries its tuple of label words; ``label_words[label]`` is the
word the LM should predict. Multi-candidate tasks become binary examples:
MultiRC one per (question, answer), ReCoRD one per (query, candidate entity)
with ``@placeholder`` filled in; COPA stays one two-way example naming both
choices. Prompt words are plain lower-case English, so a word-level tokenizer
trained on the data can hold them (pass them as its ``required`` words).

Layout followed: the official SuperGLUE v2 JSON-lines release
(``dl.fbaipublicfiles.com/glue/superglue/data/v2/<Task>.zip``), with field names
and nesting as parsed by the Hugging Face ``super_glue`` loading script
(huggingface/datasets ``datasets/super_glue/super_glue.py``) and jiant's task
readers (nyu-mll/jiant ``jiant/tasks/lib/{record,multirc,wic,wsc,copa}.py``),
and class orders as in the Hugging Face ``super_glue`` dataset card. Two facts
from those sources matter here: ReCoRD entity spans are inclusive
(``text[start:end + 1]``), and MultiRC passages carry ``<b>Sent N: </b>`` and
``<br>`` markup, which is stripped from the prompt.

Top-level fields are checked strictly (a typo would otherwise drop a column
silently); nested objects only need the fields used, because the release has
extra nested metadata (MultiRC's ``sentences_used``, ``multisent``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from flglm.data.readers import DataFormatError, Example, _json_object
from flglm.data.summarization import SUMMARIZATION_FORMATS, read_summarization
from flglm.input_files import require_file

__all__ = [
    "SUPERGLUE_TASKS",
    "TASK_FORMATS",
    "SuperGlueFormat",
    "read_task_file",
]

_PLACEHOLDER = "@placeholder"
_TEST_SPLIT_HINT = "test-split files have no labels: read them with labelled=False"


@dataclass(frozen=True)
class _Where:
    """The file and 1-based line a record came from, so any check can name both."""

    path: Path
    line: int

    def fail(self, problem: str) -> NoReturn:
        raise DataFormatError(self.path, problem, line=self.line)


# --- typed field access ----------------------------------------------------------


def _value(record: dict[str, Any], name: str, where: _Where, at: str) -> Any:
    if name not in record:
        hint = f" ({_TEST_SPLIT_HINT})" if name == "label" else ""
        where.fail(f"missing field {at + name!r}{hint}; fields are {sorted(record)}")
    return record[name]


def _string(record: dict[str, Any], name: str, where: _Where, at: str = "") -> str:
    value = _value(record, name, where, at)
    if not isinstance(value, str):
        where.fail(f"field {at + name!r} is not a string: {value!r}")
    return value


def _integer(record: dict[str, Any], name: str, where: _Where, at: str = "") -> int:
    value = _value(record, name, where, at)
    # bool is a subclass of int, but true/false in an index field is a wrong type.
    if isinstance(value, bool) or not isinstance(value, int):
        where.fail(f"field {at + name!r} is not an integer: {value!r}")
    return value


def _boolean(record: dict[str, Any], name: str, where: _Where, at: str = "") -> bool:
    value = _value(record, name, where, at)
    if not isinstance(value, bool):
        where.fail(f"field {at + name!r} is not true or false: {value!r}")
    return value


def _object(record: dict[str, Any], name: str, where: _Where, at: str = "") -> dict[str, Any]:
    value = _value(record, name, where, at)
    if not isinstance(value, dict):
        where.fail(f"field {at + name!r} is not a JSON object: {value!r}")
    return value


def _objects(record: dict[str, Any], name: str, where: _Where, at: str = "") -> list[dict[str, Any]]:
    value = _value(record, name, where, at)
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        where.fail(f"field {at + name!r} is not a list of JSON objects: {value!r}")
    return value


def _choice(record: dict[str, Any], name: str, names: tuple[str, ...], where: _Where, at: str = "") -> int:
    value = _string(record, name, where, at)
    if value not in names:
        where.fail(f"field {at + name!r} is {value!r}, expected one of {list(names)}")
    return names.index(value)


def _zero_or_one(record: dict[str, Any], name: str, where: _Where, at: str = "") -> int:
    value = _integer(record, name, where, at)
    if value not in (0, 1):
        where.fail(f"field {at + name!r} is {value}, expected 0 or 1")
    return value


# --- text clean-up -----------------------------------------------------------------

_MULTIRC_SENTENCE_TAG = re.compile(r"<b>\s*Sent\s+\d+\s*:\s*</b>")
_MULTIRC_BREAK = re.compile(r"<br\s*/?>")


def _squash(text: str) -> str:
    """One space between words: newlines and markup gaps mean nothing to the prompt."""
    return " ".join(text.split())


def _sentences(parts: list[str]) -> str:
    """Join text pieces as sentences, ending each that lacks it with a full stop."""
    kept = [part.strip() for part in parts if part.strip()]
    return " ".join(part if part[-1] in ".!?" else part + "." for part in kept)


def _multirc_paragraph(text: str) -> str:
    return _squash(_MULTIRC_BREAK.sub(" ", _MULTIRC_SENTENCE_TAG.sub(" ", text)))


def _record_passage(text: str) -> str:
    # ReCoRD appends the article's bullet points as "\n@highlight\n<bullet>".
    return _squash(_sentences(text.split("@highlight")))


def _question(text: str) -> str:
    text = text.strip()
    return text if text.endswith("?") else text + "?"


# --- one function per task: record -> examples -------------------------------------


def _boolq(record: dict[str, Any], where: _Where, labelled: bool) -> list[Example]:
    passage = _string(record, "passage", where)
    question = _string(record, "question", where)
    label = int(_boolean(record, "label", where)) if labelled else None
    return [Example(_squash(f"{passage} question: {_question(question)} answer:"), label)]


_CB_LABELS = ("entailment", "contradiction", "neutral")
_RTE_LABELS = ("entailment", "not_entailment")


def _cb(record: dict[str, Any], where: _Where, labelled: bool) -> list[Example]:
    premise = _string(record, "premise", where)
    hypothesis = _string(record, "hypothesis", where)
    label = _choice(record, "label", _CB_LABELS, where) if labelled else None
    return [Example(_squash(f"{premise} question: {hypothesis} yes, no, or maybe? answer:"), label)]


def _rte(record: dict[str, Any], where: _Where, labelled: bool) -> list[Example]:
    premise = _string(record, "premise", where)
    hypothesis = _string(record, "hypothesis", where)
    label = _choice(record, "label", _RTE_LABELS, where) if labelled else None
    return [Example(_squash(f"{premise} question: {hypothesis} yes or no? answer:"), label)]


_COPA_QUESTIONS = {"cause": "what was the cause?", "effect": "what happened as a result?"}


def _copa(record: dict[str, Any], where: _Where, labelled: bool) -> list[Example]:
    premise = _string(record, "premise", where)
    first = _string(record, "choice1", where)
    second = _string(record, "choice2", where)
    kind = _string(record, "question", where)
    if kind not in _COPA_QUESTIONS:
        where.fail(f"field 'question' is {kind!r}, expected one of {list(_COPA_QUESTIONS)}")
    label = _zero_or_one(record, "label", where) if labelled else None
    text = f"{premise} {_COPA_QUESTIONS[kind]} option one: {first} option two: {second} answer:"
    return [Example(_squash(text), label)]


def _multirc(record: dict[str, Any], where: _Where, labelled: bool) -> list[Example]:
    passage = _object(record, "passage", where)
    paragraph = _multirc_paragraph(_string(passage, "text", where, "passage."))
    examples = []
    for q_index, question in enumerate(_objects(passage, "questions", where, "passage.")):
        q_at = f"passage.questions[{q_index}]."
        asked = _string(question, "question", where, q_at)
        for a_index, answer in enumerate(_objects(question, "answers", where, q_at)):
            a_at = f"{q_at}answers[{a_index}]."
            candidate = _string(answer, "text", where, a_at)
            label = _zero_or_one(answer, "label", where, a_at) if labelled else None
            text = f"{paragraph} question: {asked} candidate answer: {candidate} is the candidate answer correct? answer:"
            examples.append(Example(_squash(text), label))
    return examples


def _record_entities(passage: dict[str, Any], text: str, where: _Where) -> list[str]:
    """Distinct candidate entities in first-mention order (a name recurs in a passage)."""
    entities: dict[str, None] = {}
    for index, span in enumerate(_objects(passage, "entities", where, "passage.")):
        at = f"passage.entities[{index}]."
        start, end = _integer(span, "start", where, at), _integer(span, "end", where, at)
        if not 0 <= start <= end < len(text):
            where.fail(f"entity span {at[:-1]!r} = [{start}, {end}] (end inclusive) is outside the passage of {len(text)} characters")
        entities.setdefault(text[start : end + 1], None)
    return list(entities)


def _record(record: dict[str, Any], where: _Where, labelled: bool) -> list[Example]:
    passage = _object(record, "passage", where)
    raw_text = _string(passage, "text", where, "passage.")
    entities = _record_entities(passage, raw_text, where)
    context = _record_passage(raw_text)
    examples = []
    for q_index, qa in enumerate(_objects(record, "qas", where)):
        at = f"qas[{q_index}]."
        query = _string(qa, "query", where, at)
        if _PLACEHOLDER not in query:
            where.fail(f"field {at + 'query'!r} has no {_PLACEHOLDER}: {query!r}")
        answers: set[str] = set()
        if labelled:
            if "answers" not in qa:
                where.fail(f"missing field {at + 'answers'!r} ({_TEST_SPLIT_HINT}); fields are {sorted(qa)}")
            for a_index, answer in enumerate(_objects(qa, "answers", where, at)):
                answers.add(_string(answer, "text", where, f"{at}answers[{a_index}]."))
        for entity in entities:
            statement = query.replace(_PLACEHOLDER, entity)
            label = int(entity in answers) if labelled else None
            examples.append(Example(_squash(f"{context} statement: {statement} is the statement true? answer:"), label))
    return examples


def _wic(record: dict[str, Any], where: _Where, labelled: bool) -> list[Example]:
    word = _string(record, "word", where)
    sentences = []
    for n in (1, 2):
        sentence = _string(record, f"sentence{n}", where)
        start, end = _integer(record, f"start{n}", where), _integer(record, f"end{n}", where)
        if not 0 <= start < end <= len(sentence):
            where.fail(f"span start{n}={start}, end{n}={end} is outside sentence{n} of {len(sentence)} characters")
        sentences.append(sentence)
    label = int(_boolean(record, "label", where)) if labelled else None
    text = f'{sentences[0]} {sentences[1]} question: is the word "{word}" used in the same sense in both sentences? answer:'
    return [Example(_squash(text), label)]


def _wsc(record: dict[str, Any], where: _Where, labelled: bool) -> list[Example]:
    text = _string(record, "text", where)
    target = _object(record, "target", where)
    spans = []
    for n in (1, 2):
        spans.append(_string(target, f"span{n}_text", where, "target."))
        # A word index; the release has a few spans that do not match the text
        # (Hugging Face's "wsc.fixed"), so only the type and sign are checked.
        if _integer(target, f"span{n}_index", where, "target.") < 0:
            where.fail(f"field 'target.span{n}_index' is negative")
    noun, pronoun = spans
    label = int(_boolean(record, "label", where)) if labelled else None
    prompt = f'{text} question: in the passage above, does "{pronoun}" refer to "{noun}"? answer:'
    return [Example(_squash(prompt), label)]


# --- the registry --------------------------------------------------------------------


@dataclass(frozen=True)
class SuperGlueFormat:
    """One SuperGLUE task: its JSON-lines fields, label words and prompt.

    ``label_words[i]`` is the word the LM scores for class ``i``;
    ``label_names[i]`` is what class ``i`` means in the release (for writing
    predictions back in its vocabulary).
    """

    name: str
    label_words: tuple[str, ...]
    label_names: tuple[str, ...]
    fields: tuple[str, ...]
    """Top-level fields every line must have (besides ``idx`` and ``label``)."""
    flatten: Callable[[dict[str, Any], _Where, bool], list[Example]] = field(repr=False, compare=False)
    """Turns one checked JSON record into its examples (``labelled`` as the last argument)."""
    optional: tuple[str, ...] = ()
    """Top-level fields the release has on some lines or versions; never required."""
    has_label_field: bool = True
    """False where labels sit inside nested objects (MultiRC answers, ReCoRD qas)."""

    def read(self, path: str | Path, labelled: bool = True) -> list[Example]:
        """Read a task file into prompt-filled examples, in file order.

        ``labelled=False`` reads test-split files (which have no labels) and
        gives every example ``label=None``; labels that are present are then
        ignored. Raises ``DataFormatError`` naming the file and line for a
        missing, unknown or mistyped field, a label outside its set or bad JSON.
        """
        path = Path(path)
        require_file(path, f"{self.name} JSON-lines file")
        examples: list[Example] = []
        records = 0
        with path.open("r", encoding="utf-8-sig") as handle:
            for line, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                where = _Where(path, line)
                record = _json_object(raw, path, line)
                self._check_fields(record, where, labelled)
                examples.extend(self.flatten(record, where, labelled))
                records += 1
        if records == 0:
            raise DataFormatError(path, f"file is empty (expected one {self.name} JSON object per line)")
        if not examples:
            raise DataFormatError(path, f"{records} record(s) but no examples (no candidates to score)")
        return examples

    def _check_fields(self, record: dict[str, Any], where: _Where, labelled: bool) -> None:
        allowed = {*self.fields, *self.optional, "idx"} | ({"label"} if self.has_label_field else set())
        unknown = sorted(set(record) - allowed)
        if unknown:
            where.fail(f"unknown field(s) {unknown} for {self.name}; expected {sorted(allowed)}")
        _integer(record, "idx", where)
        if labelled and self.has_label_field and "label" not in record:
            where.fail(f"missing field 'label' ({_TEST_SPLIT_HINT}); fields are {sorted(record)}")


_BINARY = ("false", "true")

_WIC_FIELDS = ("word", "sentence1", "sentence2", "start1", "end1", "start2", "end2")

SUPERGLUE_TASKS: dict[str, SuperGlueFormat] = {
    spec.name: spec
    for spec in (
        SuperGlueFormat("boolq", ("no", "yes"), _BINARY, ("question", "passage"), _boolq),
        SuperGlueFormat("cb", ("yes", "no", "maybe"), _CB_LABELS, ("premise", "hypothesis"), _cb),
        SuperGlueFormat("copa", ("one", "two"), ("choice1", "choice2"), ("premise", "choice1", "choice2", "question"), _copa),
        SuperGlueFormat("multirc", ("no", "yes"), _BINARY, ("passage",), _multirc, optional=("version",), has_label_field=False),
        SuperGlueFormat("record", ("no", "yes"), _BINARY, ("passage", "qas"), _record, optional=("source",), has_label_field=False),
        SuperGlueFormat("rte", ("yes", "no"), _RTE_LABELS, ("premise", "hypothesis"), _rte),
        SuperGlueFormat("wic", ("no", "yes"), _BINARY, _WIC_FIELDS, _wic, optional=("version",)),
        SuperGlueFormat("wsc", ("no", "yes"), _BINARY, ("text", "target"), _wsc),
    )
}

# Every name ``read_task_file`` accepts, SuperGLUE first.
TASK_FORMATS: tuple[str, ...] = (*SUPERGLUE_TASKS, *SUMMARIZATION_FORMATS)


def read_task_file(path: str | Path, format: str, *, labelled: bool = True) -> list[Example]:
    """Read a SuperGLUE or summarization file by task name.

    ``format`` is one of ``TASK_FORMATS``: a SuperGLUE task (JSON lines, see
    ``SUPERGLUE_TASKS``) or ``cnn_dailymail``/``xsum`` (JSON lines or CSV by
    suffix, giving ``Example(text=article, target=summary)``). ``labelled=False``
    reads unlabelled (test-split) files.
    """
    spec = SUPERGLUE_TASKS.get(format)
    if spec is not None:
        return spec.read(path, labelled)
    if format in SUMMARIZATION_FORMATS:
        return read_summarization(path, labelled=labelled)
    raise ValueError(f"unknown task format {format!r}; known formats are {list(TASK_FORMATS)}")
