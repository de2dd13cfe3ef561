"""ROUGE and BLEU in every language: the words they count, chosen to fit the text.

torchmetrics' ROUGE, left to its defaults, lower-cases and replaces every character outside
``a-z0-9`` by a space, so Chinese (or Russian, or Hindi) text has no words at all and scores 0.0
even against itself; its BLEU splits on spaces only, so a Chinese sentence is one "word". Here
both get the same normalisation and tokens (``task.metric_tokenizer``), passed through
torchmetrics' own ``normalizer``/``tokenizer`` arguments for ROUGE and as space-joined tokens for
BLEU (whose tokenizer is whitespace splitting):

- ``auto``: CJK characters (Han, kana, Hangul) one per token, other text split on whitespace;
- ``whitespace``: split on whitespace; ``char``: every non-space character is a token;
- ``model``: the model tokenizer's own tokens of the raw text (no normalisation).

Normalisation (all but ``model``): lower case; ROUGE drops punctuation and symbols (as
torchmetrics does for ASCII, but keeping letters, marks and digits of every script), BLEU keeps
each punctuation or symbol character as a token of its own (as sacreBLEU's ``13a`` roughly does).
On lower-case ASCII words without punctuation this is exactly torchmetrics' default ROUGE and
sacreBLEU ``13a`` BLEU.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor
from torchmetrics.text import BLEUScore, ROUGEScore

__all__ = ["METRIC_TOKENIZERS", "TextOverlapMetrics", "bleu_normalize", "metric_tokens", "rouge_normalize"]

METRIC_TOKENIZERS: tuple[str, ...] = ("auto", "whitespace", "char", "model")

# Han (with extensions and compatibility), kana, Bopomofo, Hangul: scripts written without spaces.
_CJK = "\u2e80-\u2fdf\u3040-\u30ff\u3100-\u312f\u31a0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f"
_AUTO = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


def _is_word_char(char: str) -> bool:
    return unicodedata.category(char)[0] in "LMN"  # letters, combining marks, digits


def rouge_normalize(text: str) -> str:
    """Lower case; every character but letters, marks, digits and whitespace becomes a space."""
    return "".join(c if _is_word_char(c) or c.isspace() else " " for c in text.lower())


def bleu_normalize(text: str) -> str:
    """Lower case; every punctuation or symbol character stands apart (a token of its own)."""
    return "".join(c if _is_word_char(c) or c.isspace() else f" {c} " for c in text.lower())


def metric_tokens(text: str, kind: str) -> list[str]:
    """The tokens of already normalised ``text`` for ``kind`` (``auto``, ``whitespace``, ``char``)."""
    if kind == "auto":
        return _AUTO.findall(text)
    if kind == "whitespace":
        return text.split()
    if kind == "char":
        return [c for c in text if not c.isspace()]
    raise ValueError(f"metric tokenizer must be one of {list(METRIC_TOKENIZERS[:3])} here, got {kind!r}")


def _model_tokens(tokenizer: Any, text: str) -> list[str]:
    # Whitespace inside a token (a word tokenizer never has any) would split it again in BLEU.
    return ["".join(token.split()) or "_" for token in tokenizer.tokenize(text)]


def _identity(text: str) -> str:
    return text


class TextOverlapMetrics:
    """ROUGE-1/2/L (F-measure, mean over examples) and corpus BLEU-4 with one choice of tokens.

    ``kind`` is ``task.metric_tokenizer``; ``model`` needs ``tokenizer`` (the model's).
    The torchmetrics objects are :attr:`rouge` and :attr:`bleu` (for a LightningModule to own).
    """

    def __init__(self, kind: str = "auto", *, rouge_keys: tuple[str, ...], tokenizer: Any = None) -> None:
        if kind not in METRIC_TOKENIZERS:
            raise ValueError(f"task.metric_tokenizer must be one of {list(METRIC_TOKENIZERS)}, got {kind!r}")
        if kind == "model":
            if tokenizer is None:
                raise ValueError("task.metric_tokenizer=model needs the model's tokenizer")
            split: Callable[[str], Sequence[str]] = functools.partial(_model_tokens, tokenizer)
            self._rouge_norm: Callable[[str], str] = _identity
            self._bleu_norm: Callable[[str], str] = _identity
        else:
            split = functools.partial(metric_tokens, kind=kind)
            self._rouge_norm, self._bleu_norm = rouge_normalize, bleu_normalize
        self._split = split
        self.rouge = ROUGEScore(rouge_keys=rouge_keys, use_stemmer=False, normalizer=self._rouge_norm, tokenizer=split)
        self.bleu = BLEUScore(n_gram=4, smooth=False)

    def bleu_text(self, text: str) -> str:
        """``text`` as BLEU counts it: its tokens joined by single spaces."""
        return " ".join(self._split(self._bleu_norm(text)))

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        self.rouge.update(list(predictions), [[r] for r in references])
        self.bleu.update([self.bleu_text(p) for p in predictions], [[self.bleu_text(r)] for r in references])

    def compute(self, rouge_keys: Sequence[str]) -> dict[str, Tensor]:
        """``{key: F-measure}`` for each ROUGE key, and ``bleu``."""
        rouge = self.rouge.compute()
        return {**{key: rouge[f"{key}_fmeasure"] for key in rouge_keys}, "bleu": self.bleu.compute()}

    def reset(self) -> None:
        self.rouge.reset()
        self.bleu.reset()
