"""Read labelled text examples from GLUE-style TSV and JSON-lines files.

Each client of a federation reads its own copy of a dataset, so a bad file must
fail loudly and precisely: every format error names the file, the 1-based line
number and what is wrong, instead of surfacing later as a shape mismatch.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flglm.input_files import require_file

__all__ = [
    "SUPPORTED_SUFFIXES",
    "DataFormatError",
    "Example",
    "read_examples",
    "read_jsonl",
    "read_tsv",
]

# Suffix -> format. ".json" is accepted as JSON lines because many exports use it.
SUPPORTED_SUFFIXES: dict[str, str] = {".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
_DEFAULT_TEXT_FIELD: dict[str, str] = {"tsv": "sentence", "jsonl": "text"}


@dataclass(frozen=True)
class Example:
    """One text and its class label (None when the data set is unlabelled).

    ``target`` is the reference output of a generation task (a summary); it is
    None for classification, where the answer is the ``label`` index.
    """

    text: str
    label: int | None = None
    target: str | None = None
    input_ids: tuple[int, ...] | None = None
    """Already tokenized (a fixed-length block of a plain-text file); the collator uses it as is."""


class DataFormatError(ValueError):
    """A data file exists but its content is not what the reader expects.

    The message reads ``<path>:<line>: <problem>`` (or ``<path>: <problem>``
    when no single line is at fault) so it can be pasted into an editor.
    """

    def __init__(self, path: str | Path, problem: str, *, line: int | None = None) -> None:
        self.path = Path(path)
        self.line = line
        self.problem = problem
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")


def _tsv_label(raw: str, path: Path, line: int, field: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise DataFormatError(path, f"label column {field!r} is not an integer: {raw!r}", line=line) from None


def read_tsv(
    path: str | Path,
    *,
    text_field: str = "sentence",
    label_field: str | None = "label",
) -> list[Example]:
    """Read a tab-separated file whose first row names the columns (GLUE layout).

    Quoting is off (``csv.QUOTE_NONE``) because GLUE sentences contain bare
    quote characters that must stay part of the text. Blank lines are skipped.
    ``label_field=None`` reads an unlabelled file (every ``label`` is None).
    """
    path = Path(path)
    require_file(path, "TSV file")
    examples: list[Example] = []
    with path.open("r", encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise DataFormatError(path, "file is empty (expected a header row)")
        text_col = _column(header, text_field, path)
        label_col = _column(header, label_field, path) if label_field is not None else None
        for row in reader:
            if not row:
                continue
            line = reader.line_num
            if len(row) != len(header):
                raise DataFormatError(
                    path,
                    f"expected {len(header)} tab-separated columns {header}, got {len(row)}",
                    line=line,
                )
            label = None
            if label_col is not None:
                label = _tsv_label(row[label_col], path, line, header[label_col])
            examples.append(Example(text=row[text_col], label=label))
    if not examples:
        raise DataFormatError(path, "file has a header but no data rows")
    return examples


def _column(header: list[str], field: str, path: Path) -> int:
    try:
        return header.index(field)
    except ValueError:
        raise DataFormatError(path, f"header has no column {field!r}; columns are {header}", line=1) from None


def integer_label(value: Any) -> int | None:
    """A label as an int: ints, bools (a binary label) and strings holding an int (``"1"``);
    None for anything else (floats, null, words), which callers report rather than cast."""
    if isinstance(value, bool):  # before int: bool is an int subclass but means a binary label
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _json_label(value: Any, path: Path, line: int, field: str) -> int:
    label = integer_label(value)
    if label is None:
        raise DataFormatError(path, f"field {field!r} is not an integer label: {value!r}", line=line)
    return label


def read_jsonl(
    path: str | Path,
    *,
    text_field: str = "text",
    label_field: str | None = "label",
) -> list[Example]:
    """Read one JSON object per line; blank lines are skipped.

    Labels may be ints, bools or strings holding an int (``"1"``); anything else
    (floats, null, words) is an error rather than a silent cast.
    """
    path = Path(path)
    require_file(path, "JSON-lines file")
    examples: list[Example] = []
    with path.open("r", encoding="utf-8") as handle:
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            record = _json_object(raw, path, line)
            text = _json_field(record, text_field, path, line)
            if not isinstance(text, str):
                raise DataFormatError(path, f"field {text_field!r} is not a string: {text!r}", line=line)
            label = None
            if label_field is not None:
                value = _json_field(record, label_field, path, line)
                label = _json_label(value, path, line, label_field)
            examples.append(Example(text=text, label=label))
    if not examples:
        raise DataFormatError(path, "file has no records")
    return examples


def _json_object(raw: str, path: Path, line: int) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, f"malformed JSON: {exc.msg}", line=line) from None
    if not isinstance(record, dict):
        raise DataFormatError(path, f"expected a JSON object, got {type(record).__name__}", line=line)
    return record


def _json_field(record: dict[str, Any], field: str, path: Path, line: int) -> Any:
    if field not in record:
        raise DataFormatError(path, f"missing field {field!r}; fields are {sorted(record)}", line=line)
    return record[field]


def read_examples(
    path: str | Path,
    *,
    text_field: str | None = None,
    label_field: str | None = "label",
    fmt: str = "auto",
) -> list[Example]:
    """Read a data file, choosing the reader from ``fmt`` or the file suffix.

    ``text_field=None`` uses the format's usual column: ``sentence`` for TSV
    (GLUE), ``text`` for JSON lines. ``fmt`` is ``"auto"``, ``"tsv"`` or ``"jsonl"``.
    """
    path = Path(path)
    kind = _format_of(path, fmt)
    field = text_field if text_field is not None else _DEFAULT_TEXT_FIELD[kind]
    if kind == "tsv":
        return read_tsv(path, text_field=field, label_field=label_field)
    return read_jsonl(path, text_field=field, label_field=label_field)


def _format_of(path: Path, fmt: str) -> str:
    if fmt in _DEFAULT_TEXT_FIELD:
        return fmt
    if fmt != "auto":
        known = ["auto", *_DEFAULT_TEXT_FIELD]
        raise ValueError(f"unknown data format {fmt!r}; expected one of {known}")
    kind = SUPPORTED_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"cannot tell the format of {path} from its suffix {path.suffix!r}; supported suffixes are {sorted(SUPPORTED_SUFFIXES)} (or pass fmt=)"
        )
    return kind
