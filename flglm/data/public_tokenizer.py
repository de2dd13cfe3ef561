"""``flglm tokenizer``: one tokenizer for the whole federation, built from text named as public.

Every client must use one vocabulary (their embedding rows and the server's view of token ids
must agree, and FedAvg averages those rows), but a vocabulary trained on the clients' training
text is derived from private data. This builds it from files the user names as public (a
Wikipedia dump, a public Q&A set) and writes a directory for ``data.tokenizer_path`` that is
copied to every client. Training on the private training file remains possible: name it here
(or leave ``data.tokenizer_path`` unset), knowing its frequent words or merges end up in a file
every party holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from flglm.data.byte_tokenizers import byte_vocabulary_tokenizer, train_byte_bpe_tokenizer
from flglm.data.readers import read_examples
from flglm.data.superglue import TASK_FORMATS, read_task_file
from flglm.data.tokenizer import save_tokenizer, train_word_tokenizer
from flglm.input_files import require_file

__all__ = ["TOKENIZER_KINDS", "build_tokenizer_from_files", "corpus_texts"]

TOKENIZER_KINDS: tuple[str, ...] = ("byte_bpe", "bytes", "word")


def corpus_texts(paths: Sequence[str | Path], *, fmt: str = "auto", text_field: str | None = None) -> list[str]:
    """The texts of ``paths``: every non-empty line of a ``.txt`` file; the texts (and targets)
    of a data file the readers know (``fmt``, ``text_field`` as in ``data.format``/``data.text_field``)."""
    texts: list[str] = []
    for path in paths:
        path = Path(path)
        require_file(path, "corpus file")
        if path.suffix == ".txt":
            texts.extend(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
            continue
        if fmt in TASK_FORMATS:
            examples = read_task_file(path, fmt, labelled=False)
        else:
            examples = read_examples(path, text_field=text_field, label_field=None, fmt=fmt)
        texts.extend(e.text for e in examples)
        texts.extend(e.target for e in examples if e.target is not None)
    if not texts:
        raise ValueError(f"the corpus files {[str(p) for p in paths]} hold no text")
    return texts


def build_tokenizer_from_files(
    paths: Sequence[str | Path],
    *,
    kind: str,
    vocab_size: int,
    out: str | Path,
    required: Sequence[str] = (),
    fmt: str = "auto",
    text_field: str | None = None,
) -> PreTrainedTokenizerFast:
    """Build a ``kind`` tokenizer from the corpus files and save it under ``out``.

    ``bytes`` reads no text (its vocabulary is the 256 bytes); ``required`` are words that must
    be single tokens (a classification task's label words and, for ``word``, the prompt's).
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind must be one of {list(TOKENIZER_KINDS)}, got {kind!r}")
    if kind == "bytes":
        tokenizer = byte_vocabulary_tokenizer()
    else:
        texts = corpus_texts(paths, fmt=fmt, text_field=text_field)
        train = train_byte_bpe_tokenizer if kind == "byte_bpe" else train_word_tokenizer
        tokenizer = train(texts, vocab_size=vocab_size, required=required)
    save_tokenizer(tokenizer, out)
    return tokenizer
