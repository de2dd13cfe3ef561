"""Turn a file's rows into a task's Examples, by the field names the config gives.

Classification takes a text and a label, generation a prompt and a target, language
modelling a text; plain text for language modelling is cut into fixed token blocks.
A named field that a row lacks, or holds the wrong type, fails with the row, its line and
the fields it does have, so a file with other column names is never read as empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flglm.data.formats import Row
from flglm.data.readers import DataFormatError, Example, integer_label
from flglm.data.summarization import ARTICLE_FIELDS, SUMMARY_FIELDS

__all__ = ["classification_examples", "generation_examples", "text_examples", "token_blocks"]


def _value(row: Row, names: Sequence[str], role: str, path: Path) -> tuple[str, Any]:
    """The first of ``names`` the row has (one name unless a default's spellings)."""
    for name in names:
        if name in row.fields:
            return name, row.fields[name]
    wanted = repr(names[0]) if len(names) == 1 else f"one of {list(names)}"
    raise DataFormatError(path, f"row {row.index} has fields {sorted(row.fields)}, expected {role} field {wanted}", line=row.line)


def _string(row: Row, names: Sequence[str], role: str, path: Path) -> str:
    name, value = _value(row, names, role, path)
    if not isinstance(value, str):
        raise DataFormatError(path, f"row {row.index}: {role} field {name!r} is {type(value).__name__} {value!r}, expected a string", line=row.line)
    return value


def _label(row: Row, name: str, path: Path) -> int:
    _, value = _value(row, (name,), "label", path)
    label = integer_label(value)
    if label is None:
        raise DataFormatError(path, f"row {row.index}: label field {name!r} is {type(value).__name__} {value!r}, expected an integer", line=row.line)
    return label


def classification_examples(rows: Sequence[Row], path: str | Path, *, text_field: str, label_field: str | None) -> list[Example]:
    """``Example(text, label)`` per row; ``label_field=None`` reads unlabelled data."""
    path = Path(path)
    return [
        Example(
            text=_string(row, (text_field,), "text", path),
            label=_label(row, label_field, path) if label_field is not None else None,
        )
        for row in rows
    ]


def generation_examples(rows: Sequence[Row], path: str | Path, *, prompt_field: str | None, target_field: str | None) -> list[Example]:
    """``Example(text=prompt, target=target)`` per row.

    An unset field accepts the summarization spellings (``article``/``document`` and
    ``summary``/``highlights``), so CNN/DailyMail and XSum exports read unchanged.
    """
    path = Path(path)
    prompts = (prompt_field,) if prompt_field is not None else ARTICLE_FIELDS
    targets = (target_field,) if target_field is not None else SUMMARY_FIELDS
    return [Example(text=_string(row, prompts, "prompt", path), target=_string(row, targets, "target", path)) for row in rows]


def text_examples(rows: Sequence[Row], path: str | Path, *, text_field: str) -> list[Example]:
    """``Example(text)`` per row (language modelling on records: one sequence per row)."""
    path = Path(path)
    return [Example(text=_string(row, (text_field,), "text", path)) for row in rows]


def token_blocks(texts: Sequence[str], tokenizer: Any, block_size: int, *, source: str | Path) -> list[Example]:
    """Concatenate the texts' tokens and cut them into blocks of exactly ``block_size``.

    As Hugging Face's ``run_clm`` example does: no special tokens are added, and the last
    ``len % block_size`` tokens are dropped (a short block would need padding the model never
    sees elsewhere). Each block keeps its ids in ``input_ids`` and its decoded text in ``text``.
    """
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    count = len(ids) // block_size
    if count == 0:
        raise DataFormatError(source, f"has {len(ids)} tokens, fewer than one block of data.max_length={block_size}")
    blocks = [tuple(ids[i * block_size : (i + 1) * block_size]) for i in range(count)]
    return [Example(text=tokenizer.decode(list(block)), input_ids=block) for block in blocks]
