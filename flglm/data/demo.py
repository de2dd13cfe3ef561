"""A synthetic binary sentiment data set in the SST-2 file layout.

Lets examples, tests and benchmarks run offline with no downloads. Each
sentence has one sentiment-bearing core (an adjective or a verb), padded with
neutral filler phrases to 5-25 words. About a third of the cores are negated
with "not", which flips the label, so a bag of words cannot solve the task but
a small sequence model can.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

__all__ = ["MAX_WORDS", "MIN_WORDS", "NEGATION_RATE", "write_demo_dataset"]

_T = TypeVar("_T")

MIN_WORDS = 5
MAX_WORDS = 25
NEGATION_RATE = 0.35

_SUBJECTS = (
    "the movie",
    "this film",
    "the plot",
    "the acting",
    "the soundtrack",
    "the story",
    "the cast",
    "the ending",
    "this sequel",
    "the script",
    "the dialogue",
    "the director 's latest",
    "the lead performance",
    "the camera work",
    "the second act",
    "this documentary",
)
_ADJECTIVES = {
    1: (
        "wonderful",
        "brilliant",
        "charming",
        "moving",
        "delightful",
        "funny",
        "clever",
        "beautiful",
        "gripping",
        "superb",
        "touching",
        "enjoyable",
        "fresh",
        "smart",
    ),
    0: (
        "boring",
        "dull",
        "awful",
        "tedious",
        "clumsy",
        "bland",
        "predictable",
        "painful",
        "messy",
        "lifeless",
        "shallow",
        "forgettable",
        "stale",
        "silly",
    ),
}
# (past tense, base form): the base form follows "did not".
_VERBS = {
    1: (("loved", "love"), ("enjoyed", "enjoy"), ("admired", "admire"), ("liked", "like"), ("recommended", "recommend"), ("cherished", "cherish")),
    0: (("hated", "hate"), ("disliked", "dislike"), ("regretted", "regret"), ("resented", "resent"), ("despised", "despise"), ("loathed", "loathe")),
}
_PEOPLE = ("i", "we", "my friends", "the critics", "everyone", "my sister", "the audience")
_INTENSIFIERS = ("very", "really", "truly", "remarkably", "quite", "utterly", "rather")
_COPULAS = ("is", "was", "seems", "felt")
_FILLERS = (
    "honestly",
    "overall",
    "frankly",
    "again",
    "somehow",
    "in the end",
    "to be honest",
    "all things considered",
    "from start to finish",
    "for what it is worth",
    "on the whole",
    "if you ask me",
    "after two long hours",
    "at the local cinema",
    "on a quiet tuesday night",
    "with a big bowl of popcorn",
    "in the second half",
    "as far as i can tell",
    "according to the poster outside",
    "during the late screening",
    "at least for me",
    "with the lights down low",
    "next to a stranger",
    "after a long week at work",
)


def _pick(rng: np.random.Generator, options: Sequence[_T]) -> _T:
    return options[int(rng.integers(len(options)))]


def _core(rng: np.random.Generator, polarity: int, negate: bool) -> list[str]:
    """The sentiment-bearing clause: polarity is the word's, before negation."""
    if rng.random() < 0.6:
        words = [_pick(rng, _SUBJECTS), _pick(rng, _COPULAS)]
        if negate:
            words.append("not")
        if rng.random() < 0.4:
            words.append(_pick(rng, _INTENSIFIERS))
        words.append(_pick(rng, _ADJECTIVES[polarity]))
    else:
        past, base = _pick(rng, _VERBS[polarity])
        verb = ["did", "not", base] if negate else [past]
        words = [_pick(rng, _PEOPLE), *verb, _pick(rng, _SUBJECTS)]
    return " ".join(words).split()


def _sentence(rng: np.random.Generator, label: int) -> str:
    negate = bool(rng.random() < NEGATION_RATE)
    words = _core(rng, label ^ int(negate), negate)
    target = int(rng.integers(MIN_WORDS, MAX_WORDS + 1))
    while len(words) < target:
        room = MAX_WORDS - len(words)
        fitting = [filler.split() for filler in _FILLERS if len(filler.split()) <= room]
        filler = fitting[int(rng.integers(len(fitting)))]  # one-word fillers always fit
        words = [*filler, *words] if rng.random() < 0.5 else [*words, *filler]
    return " ".join(words)


def _rows(rng: np.random.Generator, count: int) -> list[tuple[int, str]]:
    labels = rng.permutation(np.arange(count) % 2)  # balanced: counts differ by at most 1
    return [(int(label), _sentence(rng, int(label))) for label in labels]


def _write(path: Path, rows: list[tuple[int, str]]) -> None:
    lines = ["label\tsentence", *(f"{label}\t{text}" for label, text in rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_demo_dataset(directory: Path, *, train_rows: int = 2000, dev_rows: int = 400, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.tsv`` and ``dev.tsv`` into ``directory``; return their paths.

    The same seed always writes the same bytes. Train and dev come from
    independent random streams, so changing ``train_rows`` leaves dev unchanged.
    """
    for name, value in (("train_rows", train_rows), ("dev_rows", dev_rows)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train_stream, dev_stream = np.random.SeedSequence(seed).spawn(2)
    train_path, dev_path = directory / "train.tsv", directory / "dev.tsv"
    _write(train_path, _rows(np.random.default_rng(train_stream), train_rows))
    _write(dev_path, _rows(np.random.default_rng(dev_stream), dev_rows))
    return train_path, dev_path
