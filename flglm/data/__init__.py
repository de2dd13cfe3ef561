"""The data layer: read examples, split them among clients, tokenize them.

Everything here is deterministic given its inputs and a seed, so each process
of a federation can build its own share of the data without coordination.
"""

from flglm.data.byte_tokenizers import byte_vocabulary_tokenizer, train_byte_bpe_tokenizer
from flglm.data.demo import write_demo_dataset
from flglm.data.partition import (
    PARTITION_KINDS,
    EmptyPartitionError,
    check_partition,
    partition,
    partition_dirichlet,
    partition_iid,
)
from flglm.data.readers import (
    SUPPORTED_SUFFIXES,
    DataFormatError,
    Example,
    read_examples,
    read_jsonl,
    read_tsv,
)
from flglm.data.summarization import (
    ARTICLE_FIELDS,
    SUMMARIZATION_FORMATS,
    SUMMARY_FIELDS,
    read_summarization,
)
from flglm.data.superglue import (
    SUPERGLUE_TASKS,
    TASK_FORMATS,
    SuperGlueFormat,
    read_task_file,
)
from flglm.data.tokenizer import (
    SPECIAL_TOKENS,
    load_tokenizer,
    save_tokenizer,
    tokenizer_fingerprint,
    train_word_tokenizer,
)
from flglm.data.unknown_tokens import warn_if_many_unknown

__all__ = [
    "ARTICLE_FIELDS",
    "PARTITION_KINDS",
    "SPECIAL_TOKENS",
    "SUMMARIZATION_FORMATS",
    "SUMMARY_FIELDS",
    "SUPERGLUE_TASKS",
    "SUPPORTED_SUFFIXES",
    "TASK_FORMATS",
    "DataFormatError",
    "EmptyPartitionError",
    "Example",
    "SuperGlueFormat",
    "byte_vocabulary_tokenizer",
    "check_partition",
    "load_tokenizer",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "read_examples",
    "read_jsonl",
    "read_summarization",
    "read_task_file",
    "read_tsv",
    "save_tokenizer",
    "tokenizer_fingerprint",
    "train_byte_bpe_tokenizer",
    "train_word_tokenizer",
    "warn_if_many_unknown",
    "write_demo_dataset",
]
