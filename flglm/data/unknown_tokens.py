"""How much of a dataset the tokenizer cannot represent, and a warning when it is too much.

A word-level tokenizer maps every word it has not seen to ``[UNK]``, and decoding drops it: on
text in a language without spaces that can be half the tokens, and the run trains on noise
without any error. So each dataset is measured once, when it is loaded, and a share above
:data:`UNKNOWN_WARN_SHARE` is logged with the file it came from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

__all__ = ["UNKNOWN_WARN_SHARE", "unknown_token_counts", "warn_if_many_unknown"]

log = logging.getLogger("flglm")

UNKNOWN_WARN_SHARE = 0.01
"""More than this share of ``[UNK]`` among a dataset's tokens is worth a warning."""


def unknown_token_counts(tokenizer: Any, texts: Sequence[str]) -> tuple[int, int]:
    """(unknown tokens, all tokens) of ``texts``, special tokens not counted."""
    unk = tokenizer.unk_token_id
    if unk is None or not texts:
        return 0, 0
    unknown = total = 0
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        total += len(ids)
        unknown += sum(1 for i in ids if i == unk)
    return unknown, total


def warn_if_many_unknown(tokenizer: Any, texts: Sequence[str], *, source: str, threshold: float = UNKNOWN_WARN_SHARE) -> float:
    """Log one warning naming ``source`` when more than ``threshold`` of its tokens are unknown;
    return the share (0.0 for no tokens)."""
    unknown, total = unknown_token_counts(tokenizer, texts)
    share = unknown / total if total else 0.0
    if share > threshold:
        log.warning(
            "%.1f%% of the tokens of %s are unknown ([UNK]: %d of %d): the tokenizer cannot represent this text; "
            "use data.tokenizer=byte_bpe or bytes (no unknown tokens in any script)",
            100 * share,
            source,
            unknown,
            total,
        )
    return share
