"""Tests for flglm.data: readers, partitioners, tokenizer and the demo data set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flglm.data import (
    SPECIAL_TOKENS,
    DataFormatError,
    EmptyPartitionError,
    Example,
    check_partition,
    load_tokenizer,
    partition,
    partition_dirichlet,
    partition_iid,
    read_examples,
    read_jsonl,
    read_tsv,
    save_tokenizer,
    tokenizer_fingerprint,
    train_word_tokenizer,
    write_demo_dataset,
)

SST2_DEV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sst2" / "dev.tsv"
FAST = settings(max_examples=60, deadline=None)  # no deadline: a loaded 2-core box is slow


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _assert_flat_cover(parts: list[list[int]], num_examples: int) -> None:
    flat = [index for part in parts for index in part]
    assert sorted(flat) == list(range(num_examples))


# --- readers: TSV -------------------------------------------------------------


def test_read_tsv_keeps_quotes_and_parses_labels(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, "a.tsv", 'label\tsentence\n1\tsaid "great" film\n0\tbad \' one\n')
    # Execute
    examples = read_tsv(path)
    # Assert
    assert examples == [Example('said "great" film', 1), Example("bad ' one", 0)]


def test_read_tsv_unlabelled_and_other_column_order(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.tsv", "sentence\tidx\nhello\t0\n\nworld\t1\n")
    examples = read_tsv(path, label_field=None)
    assert examples == [Example("hello"), Example("world")]


def test_read_tsv_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.tsv"
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        read_tsv(path)


def test_read_tsv_wrong_column_count_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.tsv", "label\tsentence\n1\tok\n0\ttoo\tmany\n")
    with pytest.raises(DataFormatError, match=r"a\.tsv:3: expected 2 tab-separated columns"):
        read_tsv(path)


def test_read_tsv_missing_column_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.tsv", "label\ttext\n1\tok\n")
    with pytest.raises(DataFormatError, match=r"a\.tsv:1: header has no column 'sentence'"):
        read_tsv(path)


def test_read_tsv_non_integer_label_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.tsv", "label\tsentence\n1\tok\npositive\tnice\n")
    with pytest.raises(DataFormatError, match=r"a\.tsv:3: .*not an integer: 'positive'"):
        read_tsv(path)


@pytest.mark.parametrize("content", ["", "label\tsentence\n"])
def test_read_tsv_empty_file_names_file(tmp_path: Path, content: str) -> None:
    path = _write(tmp_path, "empty.tsv", content)
    with pytest.raises(DataFormatError, match="empty.tsv"):
        read_tsv(path)


@pytest.mark.skipif(not SST2_DEV.is_file(), reason="SST-2 dev file not present")
def test_read_tsv_real_sst2_dev() -> None:
    examples = read_tsv(SST2_DEV)
    assert examples[0] == Example("one long string of cliches .", 0)
    assert examples[1].text.startswith("if you 've ever entertained")
    assert {example.label for example in examples} == {0, 1}
    assert len(examples) == 872


# --- readers: JSON lines --------------------------------------------------------


def test_read_jsonl_accepts_int_bool_and_int_string_labels(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": False}, {"text": "c", "label": "1"}]
    path = _write(tmp_path, "a.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n\n")
    examples = read_jsonl(path)
    assert examples == [Example("a", 1), Example("b", 0), Example("c", 1)]


def test_read_jsonl_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.jsonl", '{"text": "a", "label": 1}\n{"text": oops}\n')
    with pytest.raises(DataFormatError, match=r"a\.jsonl:2: malformed JSON"):
        read_jsonl(path)


def test_read_jsonl_missing_field_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b"}\n')
    with pytest.raises(DataFormatError, match=r"a\.jsonl:3: missing field 'label'"):
        read_jsonl(path)


@pytest.mark.parametrize("label", ["1.5", '"yes"', "null", "2.0"])
def test_read_jsonl_non_integer_label_names_file_and_line(tmp_path: Path, label: str) -> None:
    path = _write(tmp_path, "a.jsonl", '{"text": "a", "label": %s}\n' % label)
    with pytest.raises(DataFormatError, match=r"a\.jsonl:1: .*not an integer label"):
        read_jsonl(path)


def test_read_jsonl_non_object_and_empty(tmp_path: Path) -> None:
    listed = _write(tmp_path, "list.jsonl", "[1, 2]\n")
    empty = _write(tmp_path, "empty.jsonl", "\n")
    with pytest.raises(DataFormatError, match=r"list\.jsonl:1: expected a JSON object"):
        read_jsonl(listed)
    with pytest.raises(DataFormatError, match=r"empty\.jsonl"):
        read_jsonl(empty)


def test_read_jsonl_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="gone.jsonl"):
        read_jsonl(tmp_path / "gone.jsonl")


# --- readers: dispatch ------------------------------------------------------------


def test_read_examples_picks_reader_by_suffix(tmp_path: Path) -> None:
    tsv = _write(tmp_path, "a.tsv", "label\tsentence\n1\thi\n")
    jsonl = _write(tmp_path, "a.json", '{"text": "hi", "label": 1}\n')
    assert read_examples(tsv) == read_examples(jsonl) == [Example("hi", 1)]


def test_read_examples_fmt_overrides_suffix(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.txt", '{"body": "hi"}\n')
    assert read_examples(path, fmt="jsonl", text_field="body", label_field=None) == [Example("hi")]


def test_read_examples_unknown_suffix_names_path_and_suffixes(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.csv", "label,sentence\n")
    with pytest.raises(ValueError, match=r"a\.csv.*\.jsonl.*\.tsv"):
        read_examples(path)


# --- partitioners -------------------------------------------------------------------


@FAST
@given(st.integers(0, 300), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_partition_iid_covers_once_with_balanced_sizes(n: int, clients: int, seed: int) -> None:
    parts = partition_iid(n, clients, seed=seed)
    sizes = [len(part) for part in parts]
    assert len(parts) == clients
    _assert_flat_cover(parts, n)
    assert max(sizes) - min(sizes) <= 1


@FAST
@given(st.integers(0, 300), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_partition_iid_is_deterministic_by_seed(n: int, clients: int, seed: int) -> None:
    assert partition_iid(n, clients, seed=seed) == partition_iid(n, clients, seed=seed)


def test_partition_iid_seed_changes_split() -> None:
    assert partition_iid(100, 4, seed=0) != partition_iid(100, 4, seed=1)


_LABELS = st.lists(st.integers(0, 4), min_size=0, max_size=200)
_ALPHA = st.floats(0.05, 20.0)


@FAST
@given(_LABELS, st.integers(1, 8), _ALPHA, st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_partition_dirichlet_covers_once_or_explains(
    labels: list[int], clients: int, alpha: float, min_size: int, seed: int
) -> None:
    try:
        parts = partition_dirichlet(
            labels, clients, alpha=alpha, seed=seed, min_size=min_size, max_tries=30
        )
    except EmptyPartitionError as error:
        assert str(clients) in str(error) and str(min_size) in str(error)
        return
    assert len(parts) == clients
    _assert_flat_cover(parts, len(labels))
    assert all(len(part) >= min_size for part in parts)
    assert all(part == sorted(part) for part in parts)


@FAST
@given(_LABELS, st.integers(1, 8), _ALPHA, st.integers(0, 2**32 - 1))
def test_partition_dirichlet_is_deterministic_by_seed(
    labels: list[int], clients: int, alpha: float, seed: int
) -> None:
    def split() -> list[list[int]] | str:
        try:
            return partition_dirichlet(labels, clients, alpha=alpha, seed=seed, max_tries=30)
        except EmptyPartitionError as error:
            return str(error)

    assert split() == split()


def test_partition_dirichlet_small_alpha_skews_labels() -> None:
    labels = [index % 4 for index in range(400)]
    parts = partition_dirichlet(labels, 4, alpha=0.05, seed=3)
    top_share = [max(Counter(labels[i] for i in part).values()) / len(part) for part in parts]
    assert max(top_share) > 0.6


def test_partition_dirichlet_gives_up_with_clear_error() -> None:
    labels = [0] * 10
    with pytest.raises(EmptyPartitionError, match=r"alpha=0\.001.*5 clients.*5 tries"):
        partition_dirichlet(labels, 5, alpha=0.001, seed=0, min_size=2, max_tries=5)


def test_partition_dirichlet_impossible_min_size_fails_fast() -> None:
    with pytest.raises(EmptyPartitionError, match="only 5 examples"):
        partition_dirichlet([0, 1, 0, 1, 0], 3, alpha=1.0, seed=0, min_size=2)


def test_partition_dispatches_by_kind() -> None:
    labels = [0, 1] * 20
    assert partition("iid", 40, 3, seed=7) == partition_iid(40, 3, seed=7)
    assert partition("dirichlet", 40, 3, labels=labels, alpha=0.3, seed=7) == (
        partition_dirichlet(labels, 3, alpha=0.3, seed=7)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "shards"}, r"'shards'.*\['iid', 'dirichlet'\]"),
        ({"kind": "dirichlet"}, "needs labels"),
        ({"kind": "iid", "num_clients": 0}, "got 0"),
        ({"kind": "dirichlet", "labels": [0] * 10, "alpha": 0.0}, "got 0.0"),
        ({"kind": "dirichlet", "labels": [0] * 10, "alpha": float("nan")}, "got nan"),
        ({"kind": "dirichlet", "labels": [0] * 9}, "9 labels"),
    ],
)
def test_partition_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    arguments = {"num_examples": 10, "num_clients": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        partition(**arguments)


def test_check_partition_returns_indices_or_names_the_client() -> None:
    parts = [[0, 1], [2], [], [3]]
    assert check_partition(parts, 0) == [0, 1]
    expected = (
        r"client 2 of 4 has no examples \(partition=dirichlet, alpha=0\.1, 4 examples in all\)"
    )
    with pytest.raises(EmptyPartitionError, match=expected):
        check_partition(parts, 2, "partition=dirichlet, alpha=0.1")


# --- tokenizer ------------------------------------------------------------------------

_TEXTS = ["The film is GOOD .", "the film is bad , not good", "a b c d e", "good good bad"]


def test_tokenizer_special_ids_are_fixed() -> None:
    tokenizer = train_word_tokenizer(_TEXTS, vocab_size=10)
    vocab = tokenizer.get_vocab()
    assert [vocab[token] for token in SPECIAL_TOKENS.values()] == [0, 1, 2, 3]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id) == (0, 1)
    assert (tokenizer.eos_token_id, tokenizer.unk_token_id) == (2, 3)
    assert tokenizer.padding_side == "right"


def test_tokenizer_vocab_size_counts_specials_and_ranks_by_count_then_word() -> None:
    tokenizer = train_word_tokenizer(_TEXTS, vocab_size=8)
    vocab = tokenizer.get_vocab()
    assert len(vocab) == 8
    # counts: good 4, bad 2, film 2, is 2, the 2 -> ties broken alphabetically
    assert [word for word, _ in sorted(vocab.items(), key=lambda kv: kv[1])][4:] == [
        "good", "bad", "film", "is",
    ]


def test_tokenizer_training_is_deterministic_across_input_order() -> None:
    first = train_word_tokenizer(_TEXTS, vocab_size=12)
    second = train_word_tokenizer(list(reversed(_TEXTS)), vocab_size=12)
    assert first.get_vocab() == second.get_vocab()
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second)


def test_tokenizer_prepends_bos_and_maps_unknown_words() -> None:
    tokenizer = train_word_tokenizer(_TEXTS, vocab_size=12)
    ids = tokenizer("Good zebra")["input_ids"]
    assert ids[0] == 1
    assert ids[2] == 3
    assert tokenizer("good", add_special_tokens=False)["input_ids"] == ids[1:2]


def test_tokenizer_pads_on_the_right() -> None:
    tokenizer = train_word_tokenizer(_TEXTS, vocab_size=12)
    batch = tokenizer(["good", "the film is good"], padding=True)
    assert batch["input_ids"][0][2:] == [0, 0, 0]
    assert batch["attention_mask"][0] == [1, 1, 0, 0, 0]


def test_tokenizer_save_load_round_trip(tmp_path: Path) -> None:
    tokenizer = train_word_tokenizer(_TEXTS, vocab_size=40)  # every word known
    loaded = load_tokenizer(save_tokenizer(tokenizer, tmp_path / "tok"))
    text = "the film is not good ."
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tokenizer)
    assert loaded.padding_side == "right"


def test_load_tokenizer_missing_directory_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such_tok"):
        load_tokenizer(tmp_path / "no_such_tok")


def test_tokenizer_fingerprint_differs_for_different_vocab() -> None:
    small = train_word_tokenizer(_TEXTS, vocab_size=8)
    large = train_word_tokenizer(_TEXTS, vocab_size=12)
    assert tokenizer_fingerprint(small) != tokenizer_fingerprint(large)


def test_tokenizer_rejects_too_small_vocab() -> None:
    with pytest.raises(ValueError, match="got 4"):
        train_word_tokenizer(_TEXTS, vocab_size=4)


# --- demo data set ---------------------------------------------------------------------


def test_demo_dataset_is_deterministic_by_seed(tmp_path: Path) -> None:
    first = write_demo_dataset(tmp_path / "a", train_rows=200, dev_rows=50, seed=5)
    second = write_demo_dataset(tmp_path / "b", train_rows=200, dev_rows=50, seed=5)
    other = write_demo_dataset(tmp_path / "c", train_rows=200, dev_rows=50, seed=6)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert first[0].read_bytes() != other[0].read_bytes()


def test_demo_dataset_is_balanced_lowercase_and_sized(tmp_path: Path) -> None:
    train, dev = write_demo_dataset(tmp_path, train_rows=301, dev_rows=40, seed=0)
    examples = read_tsv(train)
    counts = Counter(example.label for example in examples)
    lengths = [len(example.text.split()) for example in examples]
    assert len(examples) == 301 and len(read_tsv(dev)) == 40
    assert abs(counts[0] - counts[1]) <= 1
    assert min(lengths) >= 5 and max(lengths) <= 25
    assert all(example.text == example.text.lower() for example in examples)


def test_demo_dataset_negation_occurs_with_both_labels(tmp_path: Path) -> None:
    train, _ = write_demo_dataset(tmp_path, train_rows=400, dev_rows=10, seed=1)
    negated = [e.label for e in read_tsv(train) if "not" in e.text.split()]
    assert 0.2 < len(negated) / 400 < 0.5
    assert set(negated) == {0, 1}


def test_required_words_stay_in_the_vocabulary_however_rare() -> None:
    texts = ["common words here"] * 50 + ["rare"]

    tokenizer = train_word_tokenizer(texts, vocab_size=6, required=["rare sentiment"])

    ids = tokenizer("rare sentiment", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) == 2
