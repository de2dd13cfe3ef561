"""This process's share of the data and the federation's tokenizer, from the config.

In an experiment one training file is divided among the clients (``iid`` or ``dirichlet``):
each client reads the file and keeps only its own partition, computed deterministically
from the seed, so no process has to hand data to another. With ``partition=none`` every
client's ``train_path`` (``{client}`` substituted) is its own file, and a centralized run
trains on their union, client by client. Rows are read by ``flglm.data.formats`` (any
layout) and mapped to examples by ``flglm.data.fields`` (the fields the config names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from flglm.config import ConfigError, RunConfig
from flglm.data import (
    SUPERGLUE_TASKS,
    TASK_FORMATS,
    Example,
    byte_vocabulary_tokenizer,
    check_partition,
    load_tokenizer,
    partition,
    read_task_file,
    save_tokenizer,
    train_byte_bpe_tokenizer,
    train_word_tokenizer,
)
from flglm.data.chat import ChatTemplateError, check_chat_template
from flglm.data.fields import classification_examples, generation_examples, text_examples, token_blocks
from flglm.data.formats import file_format, read_rows, read_text
from flglm.input_files import client_path
from flglm.run_layout import tokenizer_dir

DEFAULT_LABEL_WORDS: tuple[str, ...] = ("negative", "positive")
"""The label words of a classification task on plain ``tsv``/``jsonl`` data (a sentiment task)."""


def task_prompt(cfg: RunConfig) -> str:
    """``task.prompt``, or when unset the prompt that suits the task kind and the data format.

    SuperGLUE texts are already prompts ending in ``answer:``, so they get none of their own.
    """
    if cfg.task.prompt is not None:
        return cfg.task.prompt
    if cfg.task.kind == "generation":
        return "{text} summary :"
    if cfg.data.format in SUPERGLUE_TASKS:
        return "{text}"
    return "{text} sentiment :"


def task_label_words(cfg: RunConfig) -> list[str]:
    """``task.label_words``, or when unset the SuperGLUE task's verbalizer (else negative/positive).

    Raises:
        ConfigError: explicit words for a SuperGLUE format whose class count they do not match
            (labels would index past the words).
    """
    spec = SUPERGLUE_TASKS.get(cfg.data.format)
    if cfg.task.label_words is None:
        return list(spec.label_words) if spec is not None else list(DEFAULT_LABEL_WORDS)
    if spec is not None and len(cfg.task.label_words) != len(spec.label_words):
        raise ConfigError(
            f"task.label_words={cfg.task.label_words} has {len(cfg.task.label_words)} words but data.format="
            f"{cfg.data.format} has {len(spec.label_words)} classes {list(spec.label_names)}"
        )
    return list(cfg.task.label_words)


def truncation_side(cfg: RunConfig) -> str:
    """``left`` (keep a text's end) or ``right`` (keep its start); see ``data.truncation_side``."""
    if cfg.data.truncation_side != "auto":
        return cfg.data.truncation_side
    return "left" if cfg.data.format in SUPERGLUE_TASKS else "right"


def _is_plain_text(cfg: RunConfig, path: str) -> bool:
    return cfg.data.format not in TASK_FORMATS and file_format(path, cfg.data.format) == "text"


def _read_raw(cfg: RunConfig, path: str) -> list[Example]:
    """The file's examples as written: a plain-text file gives one per non-blank line."""
    if cfg.data.format in TASK_FORMATS:
        # The config allows a task format only with its task kind, which always needs labels.
        return read_task_file(path, cfg.data.format, labelled=True)
    if _is_plain_text(cfg, path):
        if cfg.task.kind != "language_modeling":
            raise ConfigError(f"{path} is plain text, which only task.kind=language_modeling reads (got {cfg.task.kind})")
        return [Example(text=line) for line in read_text(path).splitlines() if line.strip()]
    rows = read_rows(path, cfg.data.format)
    if cfg.task.kind == "classification":
        return classification_examples(rows, path, text_field=cfg.data.text_field, label_field=cfg.data.label_field)
    if cfg.task.kind == "generation":
        return generation_examples(rows, path, prompt_field=cfg.data.prompt_field, target_field=cfg.data.target_field)
    return text_examples(rows, path, text_field=cfg.data.text_field)


def _read(cfg: RunConfig, path: str, max_rows: int | None, tokenizer: Any | None = None) -> list[Example]:
    """The file's examples; plain text becomes ``data.max_length`` token blocks (``max_rows`` counts
    blocks) cut by ``tokenizer`` (None: the federation's, built here)."""
    examples = _read_raw(cfg, path)
    if _is_plain_text(cfg, path):
        # The federation's tokenizer is a pure function of the config, so every process cuts the same blocks.
        tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg, save=False)
        examples = token_blocks([e.text for e in examples], tokenizer, cfg.data.max_length, source=path)
    return examples[:max_rows] if max_rows is not None else examples


def file_texts(cfg: RunConfig, path: str) -> list[str]:
    """The texts (classification, language modelling) or prompts (generation) of a file; no labels needed."""
    if cfg.data.format in TASK_FORMATS:
        return [e.text for e in read_task_file(path, cfg.data.format, labelled=False)]
    if _is_plain_text(cfg, path):
        return [line for line in read_text(path).splitlines() if line.strip()]
    rows = read_rows(path, cfg.data.format)
    if cfg.task.kind == "generation":
        return [e.text for e in generation_examples(rows, path, prompt_field=cfg.data.prompt_field, target_field=cfg.data.target_field)]
    return [e.text for e in text_examples(rows, path, text_field=cfg.data.text_field)]


def train_path(cfg: RunConfig, client_index: int | None) -> str:
    if "{client}" in cfg.data.train_path:
        if client_index is None:
            raise ConfigError("data.train_path has a {client} placeholder; name the client (or read the union of all)")
        return client_path(cfg.data.train_path, client_index)
    return cfg.data.train_path


def _union(cfg: RunConfig, template: str, max_rows: int | None, tokenizer: Any | None) -> list[Example]:
    """Every client's file, in client order, each cut to ``max_rows`` as that client's run cuts it."""
    clients = range(cfg.federation.num_clients)
    return [e for index in clients for e in _read(cfg, client_path(template, index), max_rows, tokenizer)]


def all_train_examples(cfg: RunConfig, *, tokenizer: Any | None = None) -> list[Example]:
    """The whole training data (the centralized run's; the union of all partitions or clients' files).

    ``tokenizer`` (the federation's, if the caller has it) cuts plain text into blocks; else it is built."""
    if "{client}" in cfg.data.train_path:
        return _union(cfg, cfg.data.train_path, cfg.data.max_train_rows, tokenizer)
    examples = _read(cfg, train_path(cfg, None), cfg.data.max_train_rows, tokenizer)
    if cfg.data.partition == "iid":
        # Equal shares keep every client's epoch the same length; the < num_clients
        # remainder rows are left out, here too, so both runs see the same union.
        usable = len(examples) - len(examples) % cfg.federation.num_clients
        examples = examples[:usable]
    return examples


def client_train_examples(cfg: RunConfig, client_index: int, *, tokenizer: Any | None = None) -> list[Example]:
    """Client ``client_index``'s training examples, in file order (``tokenizer``: as for :func:`all_train_examples`)."""
    if cfg.data.partition == "none":
        examples = _read(cfg, train_path(cfg, client_index), cfg.data.max_train_rows, tokenizer)
        check_partition([examples], 0, f"client {client_index}'s own file {train_path(cfg, client_index)}")
        return examples
    examples = all_train_examples(cfg, tokenizer=tokenizer)
    labels = [e.label for e in examples] if cfg.data.partition == "dirichlet" else None
    if labels is not None and any(label is None for label in labels):
        raise ConfigError("data.partition=dirichlet needs labelled training data (data.label_field)")
    parts = partition(
        cfg.data.partition,
        len(examples),
        cfg.federation.num_clients,
        labels=labels,  # type: ignore[arg-type]
        alpha=cfg.data.alpha,
        seed=cfg.seed,
    )
    description = f"partition={cfg.data.partition}" + (f", alpha={cfg.data.alpha}" if labels else "")
    mine = sorted(check_partition(parts, client_index, description))
    return [examples[i] for i in mine]


def dev_examples(cfg: RunConfig, client_index: int | None = None, *, tokenizer: Any | None = None) -> list[Example] | None:
    """The validation examples: client ``client_index``'s file, or with None the union of all clients'
    (``tokenizer``: as for :func:`all_train_examples`)."""
    if cfg.data.dev_path is None:
        return None
    if "{client}" in cfg.data.dev_path:
        if client_index is None:
            return _union(cfg, cfg.data.dev_path, cfg.data.max_dev_rows, tokenizer)
        return _read(cfg, client_path(cfg.data.dev_path, client_index), cfg.data.max_dev_rows, tokenizer)
    return _read(cfg, cfg.data.dev_path, cfg.data.max_dev_rows, tokenizer)


def build_tokenizer(cfg: RunConfig, *, save: bool) -> Any:
    """The federation's tokenizer: the pretrained model's own (if ``model.path`` ships one), a
    saved one, the byte vocabulary, or one trained on the training file (``data.tokenizer``);
    with ``task.chat_template`` it must have a chat template.

    A trained tokenizer (``word``, ``byte_bpe``) is a pure function of the training file (its
    texts and, for generation, its targets; the prompt and label words always in), so every
    process builds the same one (the server checks its fingerprint at each client's handshake).
    That vocabulary is derived from the private training text: to share none of it, build one
    from public text with ``flglm tokenizer`` and set ``data.tokenizer_path``. ``bytes`` needs no
    training. ``save`` writes it to ``run_dir/tokenizer`` so the run can be reused.
    """
    if cfg.model.path is not None and has_tokenizer(cfg.model.path):
        # Its own special tokens and chat template come with it; nothing is retrained or re-saved.
        return _checked(cfg, AutoTokenizer.from_pretrained(cfg.model.path, local_files_only=True), f"model.path={cfg.model.path}")
    if cfg.data.tokenizer_path is not None:
        return _checked(cfg, load_tokenizer(cfg.data.tokenizer_path), f"data.tokenizer_path={cfg.data.tokenizer_path}")
    if cfg.model.path is not None:
        raise ConfigError(
            f"model.path={cfg.model.path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); "
            "save the model's tokenizer there or set data.tokenizer_path"
        )
    if cfg.data.tokenizer == "bytes":
        tokenizer = byte_vocabulary_tokenizer()
        if save:
            save_run_tokenizer(cfg, tokenizer)
        return tokenizer
    if cfg.data.partition == "none":
        raise ConfigError(
            "with data.partition=none each client has its own file, so no shared tokenizer can be "
            "trained: set data.tokenizer_path to a saved tokenizer directory"
        )
    if _is_plain_text(cfg, cfg.data.train_path):
        examples = _read_raw(cfg, cfg.data.train_path)  # its lines: the blocks are cut by this tokenizer
    else:
        examples = all_train_examples(cfg)
    texts = [e.text for e in examples] + [e.target for e in examples if e.target is not None]
    required = [task_prompt(cfg).replace("{text}", " ")]
    if cfg.task.kind != "generation":
        # Language modeling too: a base model pretrained on this data may then classify with the
        # same config's prompt and label words (benchmarks/parity.py does).
        required.extend(task_label_words(cfg))
    if cfg.data.tokenizer == "byte_bpe":
        # Only the label words need to be single tokens; the prompt is bytes like any text.
        label_words = task_label_words(cfg) if cfg.task.kind != "generation" else []
        tokenizer = train_byte_bpe_tokenizer(texts, vocab_size=cfg.data.tokenizer_vocab_size, required=label_words)
    else:
        tokenizer = train_word_tokenizer(texts, vocab_size=cfg.data.tokenizer_vocab_size, required=required)
    if save:
        save_run_tokenizer(cfg, tokenizer)
    return _checked(cfg, tokenizer, "the tokenizer trained on data.train_path")


def save_run_tokenizer(cfg: RunConfig, tokenizer: Any) -> None:
    """Write a tokenizer this run built (byte vocabulary, trained) to ``run_dir/tokenizer``, so the
    run can be reused; one that came from ``model.path`` or ``data.tokenizer_path`` stays where it is."""
    if cfg.data.tokenizer_path is None and not (cfg.model.path is not None and has_tokenizer(cfg.model.path)):
        save_tokenizer(tokenizer, tokenizer_dir(cfg.run_dir))


TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""Files of which a model directory holds at least one when it ships its tokenizer (fast, sentencepiece, BPE)."""


def has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def _checked(cfg: RunConfig, tokenizer: Any, where: str) -> Any:
    """``tokenizer``, once it is known to have a chat template if ``task.chat_template`` asks for one."""
    if cfg.task.chat_template:
        try:
            check_chat_template(tokenizer, where)
        except ChatTemplateError as err:
            raise ConfigError(str(err)) from None
    return tokenizer


def check_fits_model(cfg: RunConfig, tokenizer: Any, *, vocab_size: int, max_positions: int | None) -> None:
    """The data must fit the model: token ids below its vocabulary, lengths within its limit."""
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size}")
    if max_positions is not None and cfg.data.max_length > max_positions:
        raise ConfigError(f"data.max_length={cfg.data.max_length} is longer than the model's limit of {max_positions} positions")
