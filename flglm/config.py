"""The federation's configuration: one typed schema, one loader.

A single YAML file describes the whole federation (model, split, server, clients, data,
trainer). Server and clients read the same file, so they cannot disagree; the server also
compares a fingerprint of it at each client's handshake. The file is validated against the
dataclasses below (OmegaConf structured config) before any process starts work, and
``key=value`` overrides from the command line are merged on top.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent."""


@dataclass(kw_only=True)
class ModelConfig:
    path: str | None = None
    """Local directory with a Hugging Face causal LM (config + safetensors). Never downloaded."""
    config: dict[str, Any] = field(default_factory=dict)
    """A Hugging Face config dict (with ``model_type``) for a randomly initialised model."""
    init_seed: int = 0
    """Seed of the random initialisation; each parameter is drawn from its own name-keyed stream."""
    attn_implementation: str = "sdpa"
    """Attention kernel of every block: ``sdpa`` or ``eager``."""


@dataclass(kw_only=True)
class SplitConfig:
    client_head_layers: int = 1
    """Transformer blocks kept on the client after the embedding (the input block)."""
    client_tail_layers: int = 1
    """Transformer blocks kept on the client before the final norm and LM head (the output block)."""


@dataclass(kw_only=True)
class PeftConfig:
    method: str = "none"
    """``none`` (train every weight), ``lora`` (base weights frozen on every side; LoRA adapters,
    via the ``peft`` library, on the client blocks and on the server's middle stack) or
    ``ptuning_v2`` (base weights frozen on every side; a prefix encoder on the client makes
    learned key/value prefixes for every block, those of the server's blocks cross the link)."""
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt (e.g. ``[q_proj, v_proj]``), or ``[all-linear]``: every linear layer
    of the blocks (not the LM head)."""
    prefix_length: int = 16
    """ptuning_v2: number of learned key/value positions in front of every block's attention."""
    prefix_projection: bool = False
    """ptuning_v2: make the prefixes with a two-layer MLP over prefix embeddings (peft's
    reparameterisation) instead of learning them directly."""
    prefix_hidden_size: int = 256
    """ptuning_v2 with ``prefix_projection``: hidden width of that MLP."""


@dataclass(kw_only=True)
class OptimConfig:
    name: str = "adamw"
    """``adamw`` or ``sgd``; the same optimizer runs on the client blocks and on the server."""
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0
    """SGD only."""
    scheduler: str = "constant"
    """``constant``, ``linear`` (warm-up then linear decay to 0) or ``cosine``."""
    warmup_steps: int = 0


@dataclass(kw_only=True)
class ServerConfig:
    state_timeout_s: float = 300.0
    """A forward's autograd state is released if its backward has not come within this time."""
    max_pending_per_client: int = 8
    """At most this many forwards awaiting their backward are kept per client (oldest evicted)."""
    max_decode_sessions_per_client: int = 4
    """Generation: at most this many open decoding sessions (key/value caches of the middle
    stack) per client; the least recently used is freed first. An idle session is freed after
    ``state_timeout_s``."""
    max_batch_size: int = 4096
    """Larger hidden-state batches are rejected before they touch the model."""
    rpc_timeout_s: float = 300.0
    """Timeout of every client-server call."""
    startup_timeout_s: float = 600.0
    """How long the server waits for every client to join, and a client for the server."""
    num_rpc_threads: int = 16
    num_threads: int = 0
    """Intra-op threads of a server process; 0: its share of the machine's cores (cores //
    processes on this machine). More than the share pays only where the clients wait while the
    server computes, and with ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads otherwise spin)."""
    parallelism: str = "sequential"
    """How the server serves several clients: ``sequential`` (one client's step at a time),
    ``client_batching`` (the requests of a group of clients run as one batch), ``hierarchical``
    (``sub_servers`` replicas of the middle stack, each serving its own clients, averaged every
    ``sync_every`` FedAvg rounds) or ``auto`` (hierarchical when ``sub_servers > 1``, else
    client_batching when the gathered batch fits in memory, else sequential; the choice is logged)."""
    sub_servers: int = 1
    """hierarchical: number of server processes (torchrun ranks 0..S-1); sub-server ``s`` serves
    clients ``i`` with ``i % S == s``. torchrun starts ``sub_servers + num_clients`` processes."""
    sync_every: int = 1
    """hierarchical: average the sub-servers' middle stacks (weighted by the samples each trained
    on) every this many FedAvg rounds; always at the end of training. The client blocks are
    averaged over all clients of all sub-servers at every FedAvg round."""
    sync_step: float = 1.0
    """hierarchical: at each synchronisation the middle stacks become ``anchor + sync_step *
    (average - anchor)``, the anchor being the last synchronised weights. 1: the plain
    sample-weighted average (FedAvg). ``sub_servers``: the replicas' changes add up, as if one
    server had taken every replica's steps (each replica takes only its own clients' steps, so
    plain averaging moves the middle stack 1/S as far per round as one server would)."""
    sync_timeout_s: float = 86400.0
    """hierarchical: how long a sub-server waits for the others at one synchronisation (a
    sub-server whose clients are done waits there while the others train on)."""
    max_clients_per_batch: int = 8
    """client_batching: at most this many clients share one batch."""
    batch_window_ms: float = 50.0
    """client_batching: a group closes when every active client has asked, or this long after the first."""
    client_timeout_s: float = 600.0
    """A joined client that has sent nothing, and has nothing being handled, for this long is
    dropped from the federation: its pending state is freed, FedAvg rounds and batch groups go on
    without it, and the event is logged. It can join again (as a new process, or the same one)."""
    rejoin_timeout_s: float = 0.0
    """How long the server keeps the federation open for a dropped client to join again (counted
    from its drop): without it the server finishes as soon as every other client has left, before
    a restarted process of the dropped client could come back. 0: do not wait."""
    checkpoint_every: int = 0
    """Save the server's state (trainable weights, optimizer, RNG, counters) every this many
    FedAvg rounds, and each client its trainer's checkpoint at the same rounds; 0: never. Rounds,
    not steps: only at a round are all parties at one consistent point (with
    ``federation.aggregate_every=k`` a round is every k optimizer steps)."""
    checkpoint_keep: int = 2
    """Checkpoints each party keeps (at least 2: a party may be one round ahead when a crash comes)."""
    nonfinite: str = "reject"
    """What the server does with hidden states, prefixes or gradients holding NaN or Inf:
    ``reject`` (refuse the message with an error naming it; nothing changes) or ``skip`` (log
    it, leave the model untouched and answer with zeros, so the client's step goes on without
    that contribution). Decoding steps are always refused; client batching only rejects."""
    request_timeout_s: float = 60.0
    """client_batching: a member that sends no backward/step/next forward within this time is
    dropped from its group, so the others go on."""


@dataclass(kw_only=True)
class FederationConfig:
    num_clients: int = 1
    """Number of client processes; torchrun starts ``num_clients + server.sub_servers`` processes
    (the first rank(s) serve)."""
    aggregate_every: int = 0
    """FedAvg of the client blocks every this many optimizer steps; 0: only at each epoch end."""
    max_retries: int = 3
    """A client resends a message whose answer did not come (lost, timed out after
    ``server.rpc_timeout_s``, connection reset) up to this many times; the server answers a
    resent message from its record, so nothing is applied twice. 0: fail at the first loss."""
    retry_backoff_s: float = 0.5
    """Wait before the first resend; doubled before each further one."""
    retry_backoff_max_s: float = 10.0
    """Longest wait between two resends."""
    membership: str = "static"
    """``static``: torchrun starts every process and RPC runs with a fixed world, so one process
    that dies stops the federation (torchrun ends every worker). ``dynamic``: each process is
    started on its own (server first: rank 0 hosts the rendezvous store) and joins RPC's dynamic
    group, so a client process can die and be started again while the others go on (see the
    README, "When things fail"). Needs one server process (``server.sub_servers=1``)."""


@dataclass(kw_only=True)
class FaultsConfig:
    """Fault injection for testing (all 0 in real runs): each client's link loses and duplicates
    messages at random, deterministically by ``seed`` (``flglm.link.transport.FaultyTransport``)."""

    drop_request: float = 0.0
    """Probability that a message is lost before the server sees it."""
    drop_reply: float = 0.0
    """Probability that the server handles a message but its answer is lost."""
    duplicate: float = 0.0
    """Probability that the server receives a message twice."""
    seed: int = 0
    """Client ``i`` draws its faults from seed ``seed + i``."""
    kill_server_at_step: int = 0
    """The server kills itself (SIGKILL) right after its optimizer step number N, in the first
    start only (not after a torchrun restart); 0: never. For crash-and-resume tests."""
    kill_client_at_step: int = 0
    """Client ``kill_client`` kills itself (SIGKILL) in the middle of its step N + 1: after N
    optimizer steps, once its forward has reached the server and before its backward, so the
    server holds its pending state (and, sequential, its turn); 0: never. For restart tests
    (start the restarted process without this key: faults are not part of the config fingerprint)."""
    kill_client: int = 0
    """Which client ``kill_client_at_step`` kills."""


@dataclass(kw_only=True)
class CryptoConfig:
    enabled: bool = True
    """Encrypt and authenticate every message between each client and the server (AES-256-GCM
    under per-client X25519 session keys). Turning it off changes nothing that is computed."""
    key_dir: str = "keys"
    """Holds this process's private key (``server.key`` or ``client{i}.key``, mode 0600) and the
    public keys: ``server.pub`` (pinned by clients) and ``client{i}.pub`` of every allowed client.
    ``flglm keygen --dir DIR --clients N`` writes a set."""
    server_public_key: str | None = None
    """The server's public key that clients pin (64 hex characters or a ``.pub`` path);
    default ``key_dir/server.pub``. Listed here, it is part of the config every party checks."""
    client_public_keys: list[str] = field(default_factory=list)
    """Public key of client ``i`` at position ``i`` (hex or ``.pub`` path): the only clients the
    server accepts; default ``key_dir/client{i}.pub``. If given, one per client."""
    rekey_every: int = 1048576
    """Each direction moves to a fresh key after this many messages."""
    rekey_each_epoch: bool = True
    """Clients run a new handshake (fresh ephemeral keys) at the start of every epoch."""
    secure_aggregation: bool = True
    """FedAvg through pairwise-masked uploads: the server sees only the sum of the client
    blocks, never one client's update (needs ``enabled``)."""
    max_message_mb: float = 1024.0
    """Larger sealed messages are refused before anything is decrypted or allocated."""


PRIVATE_BLOCKS: tuple[str, ...] = ("input", "output")
"""The client's parts that ``privacy.private_blocks`` may keep private."""


@dataclass(kw_only=True)
class PrivacyConfig:
    """Defenses against a curious server (``flglm.privacy.defenses``); all off by default.

    The server sees the hidden states each client sends and the gradient each client returns for
    the middle stack's output; knowing the client blocks' weights, it can invert both into the
    client's text. Noise and clipping blur what crosses the link; private blocks keep the weights
    it would invert with away from the server."""

    hidden_clip: float = 0.0
    """Per-token L2 bound of the hidden states the client sends (0: no clipping)."""
    hidden_noise: float = 0.0
    """Gaussian noise added to each sent token vector x after clipping: N(0, (hidden_noise * s)^2 / H * I)
    with s = ``hidden_clip`` if set, else ||x||, and H the hidden size, so the noise's norm is about
    ``hidden_noise * s``. Applied in training, validation and generation alike."""
    grad_clip: float = 0.0
    """Per-token L2 bound of the gradient the client returns for the server's output (0: none)."""
    grad_noise: float = 0.0
    """Gaussian noise on each returned gradient token vector, as ``hidden_noise`` (s = ``grad_clip`` or ||g||)."""
    noise_seed: int | None = None
    """None (the secure choice): each client process draws its noise (and its ``secret_init``
    weights) from a secret random state, since the server knows this config and could regenerate
    anything seeded. An int only for reproducible tests: client ``i`` uses ``noise_seed + i``, and
    its secrets are then known to whoever knows the config."""
    private_blocks: list[str] = field(default_factory=list)
    """Client parts whose parameters never leave the client: ``input`` (token [+ position]
    embedding and the head blocks) and/or ``output`` (tail blocks, final norm, LM head; with tied
    embeddings the shared matrix is private if either part is). FedAvg leaves them out, so each
    client fine-tunes them privately and the server never learns them."""
    secret_init: bool = False
    """Each client re-draws its private blocks' weights at start from a secret random state (the
    distribution of a random initialisation: norms 1, biases 0, matrices N(0, initializer_range)),
    so they never equal the public weights the server knows. Needs ``private_blocks`` and
    ``peft.method=none`` (they must train). On a pretrained model (``model.path``) this throws
    the pretrained private blocks away."""


@dataclass(kw_only=True)
class DataConfig:
    train_path: str = MISSING
    """Training file (.tsv with a header, or .jsonl). ``{client}`` is replaced by the client index."""
    dev_path: str | None = None
    """Validation file, evaluated by every client through the split."""
    text_field: str = "sentence"
    label_field: str | None = "label"
    """Columns of a ``tsv``/``jsonl`` file; ignored for the task formats below, which know theirs."""
    format: str = "auto"
    """How the data files are read: ``auto`` (by suffix: ``.tsv`` GLUE-style, ``.jsonl``/``.json``),
    ``tsv``, ``jsonl``, a SuperGLUE task (``boolq``, ``cb``, ``copa``, ``multirc``, ``record``,
    ``rte``, ``wic``, ``wsc``: the official JSON lines, each example a prompt ending in
    ``answer:``; for ``task.kind=classification``) or a summarization set (``cnn_dailymail``,
    ``xsum``: article -> summary; for ``task.kind=generation``)."""
    partition: str = "iid"
    """How one training file is divided among clients: ``iid``, ``dirichlet`` or ``none`` (each
    client's ``train_path`` is its own file)."""
    alpha: float = 0.5
    """Dirichlet concentration for ``partition=dirichlet`` (smaller: more skewed labels)."""
    max_train_rows: int | None = None
    """Use only the first N rows of the training file (a stated subset for quick experiments)."""
    max_dev_rows: int | None = None
    max_length: int = 64
    """Token budget of one example (prompt words and, for generation, the target included);
    longer texts are truncated on ``truncation_side``."""
    truncation_side: str = "auto"
    """Which end of a too-long text is cut: ``right`` keeps its start, ``left`` keeps its end.
    ``auto``: ``left`` for SuperGLUE formats (their question and ``answer:``, where the label word
    is scored, are at the end), ``right`` otherwise (a review's or an article's lead)."""
    batch_size: int = 16
    eval_batch_size: int = 64
    tokenizer_path: str | None = None
    """A saved tokenizer directory to use with a random-init model; if unset, one is trained on
    the training file (the same on every client) and saved under ``run_dir/tokenizer``."""
    tokenizer_vocab_size: int = 2000
    """Vocabulary size of the word-level tokenizer trained for a randomly initialised model."""
    shuffle: bool = True


@dataclass(kw_only=True)
class TaskConfig:
    kind: str = "classification"
    """``classification`` (prompt + verbalizer), ``generation`` (prompt -> target, e.g. article ->
    summary; loss on the target only, ROUGE/BLEU of generated text at validation) or
    ``language_modeling``."""
    prompt: str | None = None
    """Prompt template of classification and generation; ``{text}`` is the example's text (the
    source). None: ``{text}`` for SuperGLUE formats (their texts already end in ``answer:``),
    ``{text} summary :`` for generation, ``{text} sentiment :`` otherwise."""
    label_words: list[str] | None = None
    """One word per label; the LM's score of each word after the prompt classifies. None: the
    SuperGLUE task's words with a SuperGLUE ``data.format`` (e.g. boolq ``[no, yes]``), else
    ``[negative, positive]``. Set explicitly, a list replaces them (same number of classes)."""
    max_target_tokens: int = 32
    """generation: tokens of ``data.max_length`` kept for the target (end-of-text token included;
    a longer target is cut); the prompt gets the rest. Also caps the tokens generated at validation."""
    max_eval_generations: int = 32
    """generation: decode at most this many dev examples per validation for ROUGE/BLEU (decoding
    is the slow part; the loss covers every dev example). 0: no generation metrics."""
    factory: str | None = None
    """A task of your own: ``package.module:function``, called as ``function(cfg, lm, tokenizer)``
    and returning ``(task module, collate function)`` like :func:`flglm.tasks.build_task`; it
    replaces the built-in task of ``kind`` (README: "Writing your own task")."""


@dataclass(kw_only=True)
class GenerationConfig:
    """Decoding through the split (``generate()`` on a task module, ``flglm generate``)."""

    max_new_tokens: int = 32
    do_sample: bool = False
    """False: greedy (the most likely token each step). True: sample from the distribution
    shaped by ``temperature``, ``top_k`` and ``top_p``."""
    temperature: float = 1.0
    top_k: int = 0
    """Sample among the k most likely tokens only (0: no limit)."""
    top_p: float = 1.0
    """Sample among the smallest set of tokens whose probability adds up to p (1: no limit)."""
    seed: int = 0
    """Seed of the sampling generator (same seed, same prompts: same text)."""
    batch_size: int = 16
    """Prompts decoded together by ``generate_text`` and ``flglm generate``: a longer list runs in
    batches of this many, one after another, so memory does not grow with the list (batch ``k``
    samples with ``seed + k``)."""


@dataclass(kw_only=True)
class TrainerConfig:
    max_epochs: int = 1
    max_steps: int = -1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    precision: str = "32-true"
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    limit_val_batches: float | None = None
    num_sanity_val_steps: int = 0


@dataclass(kw_only=True)
class RunConfig:
    """The root of the configuration file."""

    seed: int = 0
    run_dir: str = "runs/default"
    """Everything a run writes goes under this directory."""
    resume: bool = False
    """Continue from the newest checkpoint round that the server and every client have (see
    ``server.checkpoint_every``); start fresh when there is none. Set it from the first start to
    let ``torchrun --max-restarts`` restart a failed federation where it left off."""
    overwrite: bool = False
    """Start on a run_dir holding a finished run (summary.json): the old run is moved aside to ``RUN_DIR.old-<UTC time>``."""
    model: ModelConfig = field(default_factory=ModelConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


# The task formats of ``flglm.data.read_task_file``, listed here so that loading a config does
# not import the data layer (and transformers); tests/test_tasks.py checks they agree.
SUPERGLUE_FORMATS: tuple[str, ...] = ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc")
SUMMARIZATION_FORMATS: tuple[str, ...] = ("cnn_dailymail", "xsum")
DATA_FORMATS: tuple[str, ...] = ("auto", "tsv", "jsonl", *SUPERGLUE_FORMATS, *SUMMARIZATION_FORMATS)

_CHOICES: dict[str, tuple[str, ...]] = {
    "optim.name": ("adamw", "sgd"),
    "peft.method": ("none", "lora", "ptuning_v2"),
    "optim.scheduler": ("constant", "linear", "cosine"),
    "data.partition": ("iid", "dirichlet", "none"),
    "task.kind": ("classification", "generation", "language_modeling"),
    "data.format": DATA_FORMATS,
    "data.truncation_side": ("auto", "left", "right"),
    "trainer.gradient_clip_algorithm": ("norm", "value"),
    "model.attn_implementation": ("sdpa", "eager"),
    "server.parallelism": ("sequential", "client_batching", "hierarchical", "auto"),
    "server.nonfinite": ("reject", "skip"),
}


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read ``path`` (YAML), merge ``key=value`` overrides, validate, and return the typed config.

    Raises:
        ConfigError: naming the offending key, for unknown keys, wrong types, missing values or
            inconsistent settings.
    """
    schema = OmegaConf.structured(RunConfig)
    layers = [schema]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        layers.append(OmegaConf.load(path))
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {bad}")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"missing required config value(s): {', '.join(missing)}")
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        where = f" (key: {key})" if key else ""
        reason = str(getattr(err, "msg", err)).splitlines()[0]  # OmegaConf appends key/type lines
        raise ConfigError(f"invalid configuration{where}: {reason}") from None
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Check the relations between values that the schema's types cannot express."""
    flat = to_dict(cfg)
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = flat[section][name]
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")
    if (cfg.model.path is None) == (not cfg.model.config):
        raise ConfigError("set exactly one of model.path (a local directory) and model.config (a config dict)")
    if cfg.model.config and "model_type" not in cfg.model.config:
        raise ConfigError("model.config needs a 'model_type' key (e.g. glm, llama, gpt2)")
    positive = {
        "federation.num_clients": cfg.federation.num_clients,
        "data.batch_size": cfg.data.batch_size,
        "data.eval_batch_size": cfg.data.eval_batch_size,
        "data.max_length": cfg.data.max_length,
        "trainer.accumulate_grad_batches": cfg.trainer.accumulate_grad_batches,
        "server.max_pending_per_client": cfg.server.max_pending_per_client,
        "server.max_decode_sessions_per_client": cfg.server.max_decode_sessions_per_client,
        "generation.max_new_tokens": cfg.generation.max_new_tokens,
        "generation.batch_size": cfg.generation.batch_size,
        "server.max_batch_size": cfg.server.max_batch_size,
        "server.max_clients_per_batch": cfg.server.max_clients_per_batch,
        "server.sub_servers": cfg.server.sub_servers,
        "server.sync_every": cfg.server.sync_every,
    }
    if cfg.peft.lora_r < 1:
        raise ConfigError(f"peft.lora_r must be >= 1, got {cfg.peft.lora_r}")
    if not 0 <= cfg.peft.lora_dropout < 1:
        raise ConfigError(f"peft.lora_dropout must be in [0, 1), got {cfg.peft.lora_dropout}")
    if cfg.peft.prefix_length < 1 or cfg.peft.prefix_hidden_size < 1:
        raise ConfigError(
            f"peft.prefix_length and peft.prefix_hidden_size must be >= 1, got {cfg.peft.prefix_length}, {cfg.peft.prefix_hidden_size}"
        )
    if cfg.server.nonfinite == "skip" and cfg.server.parallelism == "client_batching":
        raise ConfigError(
            "server.nonfinite=skip does not work with server.parallelism=client_batching (one member's NaN would "
            "be skipped for the whole gathered batch); use reject, or sequential, hierarchical or auto serving"
        )
    if not cfg.peft.target_modules:
        raise ConfigError("peft.target_modules must name at least one module (or [all-linear])")
    if not cfg.server.sync_step > 0:
        raise ConfigError(f"server.sync_step must be > 0, got {cfg.server.sync_step}")
    if not cfg.server.sync_timeout_s > 0:
        raise ConfigError(f"server.sync_timeout_s must be > 0, got {cfg.server.sync_timeout_s}")
    g = cfg.generation
    if not (g.temperature > 0 and math.isfinite(g.temperature)):
        raise ConfigError(f"generation.temperature must be finite and > 0, got {g.temperature}")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generation.top_p must be in (0, 1], got {g.top_p}")
    if g.top_k < 0:
        raise ConfigError(f"generation.top_k must be >= 0 (0: no limit), got {g.top_k}")
    if cfg.server.num_threads < 0:
        raise ConfigError(f"server.num_threads must be >= 0, got {cfg.server.num_threads}")
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key, value in {
        "split.client_head_layers": cfg.split.client_head_layers,
        "split.client_tail_layers": cfg.split.client_tail_layers,
        "federation.aggregate_every": cfg.federation.aggregate_every,
        "optim.warmup_steps": cfg.optim.warmup_steps,
    }.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    _validate_sub_servers(cfg)
    _validate_link(cfg)
    _validate_checkpoints(cfg)
    _validate_privacy(cfg.privacy)
    if cfg.privacy.secret_init and cfg.peft.method != "none":
        raise ConfigError(
            f"privacy.secret_init needs peft.method=none, got {cfg.peft.method!r}: with frozen base weights the re-drawn "
            "private blocks would never train, and a run saves only the adapters, so the secret weights would be lost"
        )
    if cfg.crypto.client_public_keys and len(cfg.crypto.client_public_keys) != cfg.federation.num_clients:
        raise ConfigError(
            f"crypto.client_public_keys lists {len(cfg.crypto.client_public_keys)} keys for "
            f"federation.num_clients={cfg.federation.num_clients}; give one per client (or none to use crypto.key_dir)"
        )
    if not 1 <= cfg.crypto.rekey_every <= 2**24:
        raise ConfigError(f"crypto.rekey_every must be in [1, {2**24}], got {cfg.crypto.rekey_every}")
    if not (cfg.crypto.max_message_mb > 0 and math.isfinite(cfg.crypto.max_message_mb)):
        raise ConfigError(f"crypto.max_message_mb must be finite and > 0, got {cfg.crypto.max_message_mb}")
    # Written as `not x > 0` so that NaN is rejected too.
    if not (cfg.optim.lr > 0 and math.isfinite(cfg.optim.lr)):
        raise ConfigError(f"optim.lr must be finite and > 0, got {cfg.optim.lr}")
    if not (cfg.data.alpha > 0 and math.isfinite(cfg.data.alpha)):
        raise ConfigError(f"data.alpha must be finite and > 0, got {cfg.data.alpha}")
    _validate_task(cfg)


def _validate_task(cfg: RunConfig) -> None:
    """The task kind, its prompt and label words, and the data format must fit together."""
    task, data = cfg.task, cfg.data
    if task.factory is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", task.factory):
        raise ConfigError(f"task.factory must look like package.module:function, got {task.factory!r}")
    if task.kind == "classification" and task.label_words is not None and len(task.label_words) < 2:
        raise ConfigError(f"task.label_words needs at least 2 words, got {task.label_words}")
    if task.kind != "language_modeling" and task.prompt is not None and "{text}" not in task.prompt:
        raise ConfigError(f"task.prompt must contain '{{text}}', got {task.prompt!r}")
    if data.format in SUPERGLUE_FORMATS and task.kind != "classification":
        raise ConfigError(f"data.format={data.format} is a classification task; set task.kind=classification, got {task.kind!r}")
    if data.format in SUMMARIZATION_FORMATS and task.kind != "generation":
        raise ConfigError(f"data.format={data.format} gives (article, summary) pairs; set task.kind=generation, got {task.kind!r}")
    if task.kind != "generation":
        return
    if data.format not in SUMMARIZATION_FORMATS:
        raise ConfigError(
            f"task.kind=generation needs (source, target) pairs: set data.format to one of {list(SUMMARIZATION_FORMATS)}, got {data.format!r}"
        )
    if not 1 <= task.max_target_tokens < data.max_length:
        raise ConfigError(
            f"task.max_target_tokens must be >= 1 and leave room for the prompt in data.max_length={data.max_length}, "
            f"got {task.max_target_tokens}"
        )
    if task.max_eval_generations < 0:
        raise ConfigError(f"task.max_eval_generations must be >= 0 (0: none), got {task.max_eval_generations}")
    if data.partition == "dirichlet":
        raise ConfigError("data.partition=dirichlet splits by class label; task.kind=generation has none (use iid)")


def _validate_privacy(p: PrivacyConfig) -> None:
    for key in ("hidden_clip", "hidden_noise", "grad_clip", "grad_noise"):
        value = getattr(p, key)
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"privacy.{key} must be finite and >= 0 (0: off), got {value}")
    unknown = [name for name in p.private_blocks if name not in PRIVATE_BLOCKS]
    if unknown:
        raise ConfigError(f"privacy.private_blocks may name only {list(PRIVATE_BLOCKS)}, got {unknown}")
    if len(set(p.private_blocks)) != len(p.private_blocks):
        raise ConfigError(f"privacy.private_blocks names a part twice: {p.private_blocks}")
    if p.secret_init and not p.private_blocks:
        raise ConfigError("privacy.secret_init re-draws the private blocks: set privacy.private_blocks (input and/or output)")
    if p.noise_seed is not None and p.noise_seed < 0:
        raise ConfigError(f"privacy.noise_seed must be >= 0 or null (a secret seed), got {p.noise_seed}")


def _validate_checkpoints(cfg: RunConfig) -> None:
    s = cfg.server
    if s.checkpoint_every < 0:
        raise ConfigError(f"server.checkpoint_every must be >= 0 (0: never), got {s.checkpoint_every}")
    if not (s.client_timeout_s > 0 and math.isfinite(s.client_timeout_s)):
        raise ConfigError(f"server.client_timeout_s must be finite and > 0, got {s.client_timeout_s}")
    if not (s.rejoin_timeout_s >= 0 and math.isfinite(s.rejoin_timeout_s)):
        raise ConfigError(f"server.rejoin_timeout_s must be finite and >= 0 (0: do not wait), got {s.rejoin_timeout_s}")
    if s.checkpoint_keep < 2:
        raise ConfigError(f"server.checkpoint_keep must be >= 2 (a party may be one round ahead at a crash), got {s.checkpoint_keep}")
    if s.checkpoint_every and (s.parallelism == "hierarchical" or s.sub_servers > 1):
        raise ConfigError("server.checkpoint_every is not supported with hierarchical sub-servers yet; use sequential or client_batching")


def _validate_link(cfg: RunConfig) -> None:
    f, faults = cfg.federation, cfg.faults
    if f.max_retries < 0:
        raise ConfigError(f"federation.max_retries must be >= 0, got {f.max_retries}")
    for key, value in (("federation.retry_backoff_s", f.retry_backoff_s), ("federation.retry_backoff_max_s", f.retry_backoff_max_s)):
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{key} must be finite and >= 0, got {value}")
    probabilities = {"faults.drop_request": faults.drop_request, "faults.drop_reply": faults.drop_reply, "faults.duplicate": faults.duplicate}
    for key, value in probabilities.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must be a probability in [0, 1], got {value}")
    if sum(probabilities.values()) > 1.0:
        raise ConfigError(f"faults.drop_request + faults.drop_reply + faults.duplicate must not exceed 1, got {sum(probabilities.values())}")
    if faults.kill_server_at_step < 0:
        raise ConfigError(f"faults.kill_server_at_step must be >= 0 (0: never), got {faults.kill_server_at_step}")
    if faults.kill_client_at_step < 0:
        raise ConfigError(f"faults.kill_client_at_step must be >= 0 (0: never), got {faults.kill_client_at_step}")
    if not 0 <= faults.kill_client < f.num_clients:
        raise ConfigError(f"faults.kill_client must be one of the clients 0..{f.num_clients - 1}, got {faults.kill_client}")
    if f.membership not in ("static", "dynamic"):
        raise ConfigError(f"federation.membership={f.membership!r} is not one of ['static', 'dynamic']")
    if f.membership == "dynamic" and (cfg.server.sub_servers > 1 or cfg.server.parallelism == "hierarchical"):
        raise ConfigError("federation.membership=dynamic runs one server process; hierarchical sub-servers need torchrun (static)")
    if (faults.drop_request or faults.drop_reply) and f.max_retries == 0:
        raise ConfigError("faults.drop_request/drop_reply lose messages; they need federation.max_retries >= 1")


def _validate_sub_servers(cfg: RunConfig) -> None:
    s = cfg.server
    if s.sub_servers > 1 and s.parallelism not in ("hierarchical", "auto"):
        raise ConfigError(
            f"server.sub_servers={s.sub_servers} needs server.parallelism=hierarchical (or auto), "
            f"got {s.parallelism!r}"
        )
    if s.sub_servers > cfg.federation.num_clients:
        raise ConfigError(
            f"server.sub_servers={s.sub_servers} is more than federation.num_clients="
            f"{cfg.federation.num_clients}: every sub-server needs at least one client"
        )


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain containers (for logging, hashing and saving with the run)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def fingerprint(cfg: RunConfig) -> str:
    """A hash of everything server and clients must agree on.

    ``run_dir`` and ``crypto.key_dir`` are left out (each machine keeps its files elsewhere);
    so is the trainer's display setting, the client's decoding settings and the test-only fault
    injection: none changes what the server computes. ``privacy`` stays in: its private blocks
    set the length of the FedAvg vector, which every client must agree on.
    """
    shared = to_dict(cfg)
    shared.pop("run_dir")
    shared.pop("resume")
    shared.pop("overwrite")
    shared.pop("generation")
    shared.pop("faults")
    shared["crypto"].pop("key_dir")
    shared["trainer"].pop("enable_progress_bar")
    blob = json.dumps(shared, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()
