"""A small word-level tokenizer that every client can rebuild identically.

Split learning only works if the client's embedding rows and the server's view
of token ids agree, and federated averaging only works if all clients share one
vocabulary. So training here is deterministic (ties between equally frequent
words are broken alphabetically, in our own code, not by the trainer's internal
order), and `tokenizer_fingerprint` lets clients compare vocabularies cheaply.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "SPECIAL_TOKENS",
    "load_tokenizer",
    "save_tokenizer",
    "tokenizer_fingerprint",
    "train_word_tokenizer",
]

# Order matters: the ids are 0, 1, 2, 3 in this order (pad is 0 so zero-filled
# buffers are padding).
SPECIAL_TOKENS: dict[str, str] = {"pad": "[PAD]", "bos": "[BOS]", "eos": "[EOS]", "unk": "[UNK]"}


def _empty_tokenizer() -> Tokenizer:
    """The normalizer and pre-tokenizer, used both to count words and to encode."""
    tokenizer = Tokenizer(models.WordLevel({}, unk_token=SPECIAL_TOKENS["unk"]))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
    return tokenizer


def _count_words(texts: Iterable[str], tokenizer: Tokenizer) -> Counter[str]:
    normalizer, pre_tokenizer = tokenizer.normalizer, tokenizer.pre_tokenizer
    counts: Counter[str] = Counter()
    for text in texts:
        # Special tokens are matched whole when encoding, so they are not words.
        for special in SPECIAL_TOKENS.values():
            text = text.replace(special, " ")
        pieces = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        counts.update(piece for piece, _ in pieces)
    return counts


def train_word_tokenizer(texts: Iterable[str], *, vocab_size: int, required: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Build a lower-cased word-level tokenizer from the most frequent words.

    ``vocab_size`` includes the four special tokens. Words are ranked by
    (-count, word), so the same texts always give the same ids. The words of
    ``required`` (a prompt, label words) are always in the vocabulary, however
    rare in the texts. Encoding with ``add_special_tokens=True`` prepends
    ``[BOS]``; padding goes on the right.
    """
    specials = list(SPECIAL_TOKENS.values())
    if vocab_size <= len(specials):
        raise ValueError(f"vocab_size must exceed the {len(specials)} special tokens, got {vocab_size}")
    tokenizer = _empty_tokenizer()
    counts = _count_words(texts, tokenizer)
    if not counts:
        raise ValueError("cannot train a tokenizer: the texts contain no words")
    must = sorted(set(_count_words(required, tokenizer)))
    if len(must) > vocab_size - len(specials):
        raise ValueError(f"vocab_size={vocab_size} cannot hold the {len(must)} required words and the special tokens")
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    rest = [word for word, _ in ranked if word not in must]
    words = must + rest[: vocab_size - len(specials) - len(must)]
    vocab = {token: index for index, token in enumerate([*specials, *words])}

    tokenizer.model = models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"])
    return wrap_tokenizer(tokenizer)


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Special tokens, the BOS template and the transformers wrapper: what every kind of random-init
    tokenizer (word, byte-level) shares, so tasks treat them alike."""
    # Registered as special so that "[BOS]" in text is one token and decode can skip them.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS.values()))
    bos = SPECIAL_TOKENS["bos"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=SPECIAL_TOKENS["pad"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        padding_side="right",
        clean_up_tokenization_spaces=False,  # decode(encode(x)) == x (normalized x for the word tokenizer)
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> Path:
    """Write the tokenizer files into ``directory`` (created if needed); return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer written by `save_tokenizer`, never touching the network.

    Loads through `PreTrainedTokenizerFast` rather than `AutoTokenizer`: the
    files always hold a fast tokenizer, and AutoTokenizer imports torch (seconds).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in tokenizer directory {directory}")
    return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 hex digest of the vocabulary, the special token ids and how text becomes tokens.

    Two tokenizers with equal fingerprints map every text to the same ids and agree on
    pad/bos/eos/unk, which is what clients of one federation need. Besides the vocabulary it
    covers the model kind and its BPE merges (two byte-level BPEs can share a vocabulary and
    merge differently), the normalizer, pre-tokenizer and decoder, and the added tokens.
    """
    special_ids = {
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
    }
    payload: dict[str, object] = {"vocab": sorted(tokenizer.get_vocab().items()), "special_ids": special_ids}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: its whole pipeline, as the library serialises it
        spec = json.loads(backend.to_str())
        model = spec.get("model", {})
        payload["model"] = {"type": model.get("type"), "merges": model.get("merges")}
        payload["pipeline"] = {key: spec.get(key) for key in ("normalizer", "pre_tokenizer", "decoder", "added_tokens")}
    encoded = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()
