"""Read CNN/DailyMail and XSum summarization data as (article, summary) examples.

Both data sets are published under different column names: CNN/DailyMail's CSV
has ``id, article, highlights`` and XSum has ``document, summary, id``; many
re-exports use plain ``article, summary``. Each file is read as JSON lines or
CSV (chosen by suffix) and every accepted spelling is mapped to
``Example(text=article, target=summary)``. As with the classification readers,
a file that does not fit fails at once with ``<path>:<line>: <problem>``
rather than training on a silently empty or misaligned column.
"""

from __future__ import annotations

import csv
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from flglm.data.readers import DataFormatError, Example, _json_object
from flglm.input_files import require_file

__all__ = [
    "ARTICLE_FIELDS",
    "SUMMARIZATION_FORMATS",
    "SUMMARIZATION_SUFFIXES",
    "SUMMARY_FIELDS",
    "read_summarization",
]

# Data-set names accepted by ``read_task_file``; both read the same layouts.
SUMMARIZATION_FORMATS: tuple[str, ...] = ("cnn_dailymail", "xsum")
ARTICLE_FIELDS: tuple[str, ...] = ("article", "document")
SUMMARY_FIELDS: tuple[str, ...] = ("summary", "highlights")
_OPTIONAL_FIELDS: tuple[str, ...] = ("id",)
_KNOWN_FIELDS = frozenset((*ARTICLE_FIELDS, *SUMMARY_FIELDS, *_OPTIONAL_FIELDS))
SUMMARIZATION_SUFFIXES: dict[str, str] = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}


def read_summarization(path: str | Path, *, labelled: bool = True) -> list[Example]:
    """Read a summarization file into ``Example(text=article, target=summary)``.

    The suffix picks the layout (``.jsonl``/``.json`` one object per line,
    ``.csv`` with a header row; CSV fields may be quoted and span lines, as
    CNN/DailyMail highlights do). ``labelled=False`` reads files without a
    summary column and leaves ``target`` None; a summary, if present, is then
    ignored. Unknown columns are errors, so a misnamed column is not dropped.
    """
    path = Path(path)
    kind = SUMMARIZATION_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"cannot tell the layout of summarization file {path} from its suffix {path.suffix!r}; "
            f"supported suffixes are {sorted(SUMMARIZATION_SUFFIXES)}"
        )
    require_file(path, "summarization file")
    rows = _csv_rows(path, labelled) if kind == "csv" else _jsonl_rows(path)
    examples = [_example(record, path, line, labelled) for line, record in rows]
    if not examples:
        raise DataFormatError(path, "file has no records")
    return examples


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    # utf-8-sig: a byte-order mark from a spreadsheet export must not break line 1.
    with path.open("r", encoding="utf-8-sig") as handle:
        for line, raw in enumerate(handle, start=1):
            if raw.strip():
                yield line, _json_object(raw, path, line)


def _csv_rows(path: Path, labelled: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("r", encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = _next_row(reader, path)
        if header is None:
            raise DataFormatError(path, "file is empty (expected a header row)")
        _check_columns(header, path, 1, labelled=labelled)
        if len(set(header)) != len(header):
            raise DataFormatError(path, f"header repeats a column name: {header}", line=1)
        while True:
            line = reader.line_num + 1  # a quoted field may span lines: report where the row starts
            row = _next_row(reader, path)
            if row is None:
                return
            if not row:
                continue
            if len(row) != len(header):
                raise DataFormatError(path, f"expected {len(header)} comma-separated columns {header}, got {len(row)}", line=line)
            yield line, dict(zip(header, row))


def _next_row(reader: Any, path: Path) -> list[str] | None:
    try:
        return next(reader, None)
    except csv.Error as exc:  # e.g. a NUL byte or a field over csv.field_size_limit()
        raise DataFormatError(path, f"malformed CSV: {exc}", line=reader.line_num) from None


def _check_columns(names: Collection[str], path: Path, line: int, *, labelled: bool) -> tuple[str, str | None]:
    """Return the article and summary column names of one record or header."""
    unknown = sorted(set(names) - _KNOWN_FIELDS)
    if unknown:
        raise DataFormatError(
            path,
            f"unknown field(s) {unknown}; expected one article field {list(ARTICLE_FIELDS)}, "
            f"one summary field {list(SUMMARY_FIELDS)} and optionally {list(_OPTIONAL_FIELDS)}",
            line=line,
        )
    article = _one_of(names, ARTICLE_FIELDS, path, line)
    summary = _one_of(names, SUMMARY_FIELDS, path, line)
    if article is None or (labelled and summary is None):
        wanted = ARTICLE_FIELDS if article is None else SUMMARY_FIELDS
        raise DataFormatError(path, f"missing field: expected one of {list(wanted)}; fields are {sorted(names)}", line=line)
    return article, summary


def _one_of(names: Collection[str], choices: tuple[str, ...], path: Path, line: int) -> str | None:
    present = [name for name in choices if name in names]
    if len(present) > 1:
        raise DataFormatError(path, f"ambiguous: both {present} are present, expected only one", line=line)
    return present[0] if present else None


def _example(record: dict[str, Any], path: Path, line: int, labelled: bool) -> Example:
    article_field, summary_field = _check_columns(record, path, line, labelled=labelled)
    article = _text(record, article_field, path, line)
    summary = _text(record, summary_field, path, line) if labelled and summary_field is not None else None
    return Example(text=article, target=summary)


def _text(record: dict[str, Any], field: str, path: Path, line: int) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise DataFormatError(path, f"field {field!r} is not a string: {value!r}", line=line)
    return value
