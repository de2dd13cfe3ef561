"""Byte-level tokenizers for a randomly initialised model: no unknown token in any script.

The word-level tokenizer (:mod:`flglm.data.tokenizer`) splits on spaces and lower-cases, so a
language without spaces (Chinese, Japanese) turns whole clauses into words and most of a dev set
into ``[UNK]``. Both tokenizers here work on UTF-8 bytes (the ``tokenizers`` library's ByteLevel
pre-tokenizer and decoder), so every text encodes without an unknown token and decodes back
exactly: case, whitespace, newlines, CJK, emoji and code.

- :func:`byte_vocabulary_tokenizer` (``bytes``): the 256 bytes and the special tokens; needs no
  training, so it is the same everywhere by construction.
- :func:`train_byte_bpe_tokenizer` (``byte_bpe``): byte-level BPE merges learnt from texts. Train
  it on text every client may see (``flglm tokenizer --corpus PUBLIC_FILE``); training on the
  private training file works too, but then the vocabulary is derived from that data.

Special tokens are those of the word tokenizer (pad, bos, eos, unk = ids 0..3, BOS prepended by
``add_special_tokens=True``, padding on the right), so tasks treat every kind alike; ``[UNK]`` is
in the vocabulary only so that code asking for ``unk_token_id`` gets one; it is never produced.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from flglm.data.tokenizer import SPECIAL_TOKENS, wrap_tokenizer

__all__ = ["byte_vocabulary_tokenizer", "bytes_to_unicode", "train_byte_bpe_tokenizer"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (the alphabet of ByteLevel).

    The ``tokenizers`` library applies this map inside its ByteLevel pre-tokenizer but does not
    expose it byte by byte; it is needed to give the 256 bytes their ids in byte order.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def _byte_level(tokenizer: Tokenizer) -> Tokenizer:
    # No prefix space: it would add a character that decoding cannot tell from the text's own.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def byte_vocabulary_tokenizer() -> PreTrainedTokenizerFast:
    """The special tokens (ids 0..3) then the 256 bytes in byte order (ids 4..259); no training."""
    specials = list(SPECIAL_TOKENS.values())
    byte_chars = bytes_to_unicode()
    vocab = {token: index for index, token in enumerate([*specials, *(byte_chars[b] for b in range(256))])}
    return wrap_tokenizer(_byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[]))))


def train_byte_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int, required: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Learn byte-level BPE merges from ``texts``; the same texts always give the same tokenizer.

    ``vocab_size`` counts the special tokens and the 256 bytes. The words of ``required``
    (classification label words) become tokens of their own (whole words only), so each is
    one id however the merges fell. Determinism is tested (``tests/test_tokenizers.py`` trains
    twice, in two processes, and compares fingerprints, merges included).
    """
    specials = list(SPECIAL_TOKENS.values())
    minimum = len(specials) + 256
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (the {len(specials)} special tokens and 256 bytes), got {vocab_size}")
    texts = list(texts)
    if not any(text for text in texts):
        raise ValueError("cannot train a byte-level BPE tokenizer: the texts are empty")
    tokenizer = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=specials,  # first, so their ids are 0..3 as for the word tokenizer
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    words = sorted({word for text in required for word in text.split()})
    if words:
        tokenizer.add_tokens([AddedToken(word, single_word=True, normalized=False) for word in words])
    return wrap_tokenizer(tokenizer)
