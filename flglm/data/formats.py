"""Read a data file's rows as field dicts: JSON arrays, JSON lines, CSV, TSV; plain text whole.

The file layout (this module) is separate from what a task takes out of a row
(``flglm.data.fields``), so every task reads every layout. Errors say what the file is
and what it has (``<path>:<line>: ...``), e.g. a JSON array read as JSON lines, a row
whose column count is off, or bytes that are not UTF-8 (with their byte offset).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flglm.data.readers import DataFormatError
from flglm.input_files import require_file

__all__ = ["FILE_FORMATS", "FILE_SUFFIXES", "Row", "file_format", "read_rows", "read_text"]

FILE_SUFFIXES: dict[str, str] = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "text"}
"""Suffix -> layout for ``data.format=auto``."""
FILE_FORMATS: tuple[str, ...] = ("json", "jsonl", "csv", "tsv", "text")


@dataclass(frozen=True)
class Row:
    """One record of a file: its 0-based index, the 1-based line it starts on, its fields."""

    index: int
    line: int
    fields: dict[str, Any]


def file_format(path: str | Path, fmt: str = "auto") -> str:
    """The layout of ``path``: ``fmt`` itself, or with ``auto`` the one its suffix names."""
    if fmt in FILE_FORMATS:
        return fmt
    if fmt != "auto":
        raise ValueError(f"unknown file format {fmt!r}; expected one of {['auto', *FILE_FORMATS]}")
    kind = FILE_SUFFIXES.get(Path(path).suffix.lower())
    if kind is None:
        raise ValueError(
            f"cannot tell the format of {path} from its suffix {Path(path).suffix!r}; supported suffixes are "
            f"{sorted(FILE_SUFFIXES)} (or set data.format to one of {list(FILE_FORMATS)})"
        )
    return kind


def read_text(path: str | Path) -> str:
    """The whole file as text (UTF-8, a byte-order mark dropped); an empty file is an error."""
    path = Path(path)
    require_file(path, "data file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataFormatError(path, f"byte {exc.start} (0x{raw[exc.start]:02x}) is not valid UTF-8: {exc.reason}", line=line) from None
    if not text.strip():
        raise DataFormatError(path, "file is empty")
    return text


def read_rows(path: str | Path, fmt: str = "auto") -> list[Row]:
    """Every record of a JSON-array, JSON-lines, CSV or TSV file, in file order.

    With ``auto`` a ``.json`` or ``.jsonl`` file is read by what it holds: ``[`` first is one
    JSON array, anything else one object per line. ``json`` and ``jsonl`` force one layout and
    say so when the file holds the other.
    """
    path = Path(path)
    kind = file_format(path, fmt)
    if kind == "text":
        raise DataFormatError(path, "a plain-text file has no fields (only task.kind=language_modeling reads text files)")
    text = read_text(path)
    starts_array = text.lstrip().startswith("[")
    if kind in ("json", "jsonl") and fmt == "auto":
        kind = "json" if starts_array else "jsonl"
    if kind == "jsonl" and starts_array:
        raise DataFormatError(path, "is a JSON array, not JSON lines (set data.format=json or auto)", line=1)
    if kind == "json" and not starts_array:
        raise DataFormatError(path, "is not a JSON array (it does not start with '['); for one object per line set data.format=jsonl", line=1)
    rows = {"json": _json_array, "jsonl": _json_lines}.get(kind, _delimited)(text, path, kind)
    if not rows:
        raise DataFormatError(path, "file has no records")
    return rows


def _line_at(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _object(value: Any, path: Path, index: int, line: int) -> Row:
    if not isinstance(value, dict):
        raise DataFormatError(path, f"row {index} is a JSON {type(value).__name__}, expected an object", line=line)
    return Row(index, line, value)


def _json_array(text: str, path: Path, kind: str) -> list[Row]:
    """Decode element by element, so each row knows the line it starts on."""
    decoder = json.JSONDecoder()
    at = text.index("[") + 1
    rows: list[Row] = []
    while True:
        at = _skip_space(text, at)
        if at < len(text) and text[at] == "]":
            if _skip_space(text, at + 1) != len(text):
                raise DataFormatError(path, "extra data after the JSON array", line=_line_at(text, at + 1))
            return rows
        if rows:
            if at >= len(text) or text[at] != ",":
                raise DataFormatError(path, "malformed JSON array: expected ',' or ']'", line=_line_at(text, at))
            at = _skip_space(text, at + 1)
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            raise DataFormatError(path, f"malformed JSON in row {len(rows)}: {exc.msg}", line=exc.lineno) from None
        rows.append(_object(value, path, len(rows), _line_at(text, at)))
        at = end


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def _json_lines(text: str, path: Path, kind: str) -> list[Row]:
    rows: list[Row] = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataFormatError(path, f"malformed JSON in row {len(rows)}: {exc.msg}", line=line) from None
        rows.append(_object(value, path, len(rows), line))
    return rows


def _delimited(text: str, path: Path, kind: str) -> list[Row]:
    """CSV (quoted fields may span lines) or TSV (GLUE: no quoting, quotes stay text)."""
    options: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if kind == "tsv" else {}
    reader = csv.reader(io.StringIO(text, newline=""), **options)
    what = "tab-separated" if kind == "tsv" else "comma-separated"
    header = _next(reader, path)
    if header is None:
        raise DataFormatError(path, "file is empty (expected a header row)")
    if len(set(header)) != len(header):
        raise DataFormatError(path, f"header repeats a column name: {header}", line=1)
    rows: list[Row] = []
    while True:
        line = reader.line_num + 1  # a quoted field may span lines: report where the row starts
        row = _next(reader, path)
        if row is None:
            return rows
        if not row:
            continue
        if len(row) != len(header):
            raise DataFormatError(path, f"row {len(rows)} has {len(row)} {what} columns, expected {len(header)} {header}", line=line)
        rows.append(Row(len(rows), line, dict(zip(header, row))))


def _next(reader: Any, path: Path) -> list[str] | None:
    try:
        return next(reader, None)
    except csv.Error as exc:  # a NUL byte, a field over csv.field_size_limit()
        raise DataFormatError(path, f"malformed CSV: {exc}", line=reader.line_num) from None
