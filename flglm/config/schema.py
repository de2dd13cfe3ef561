"""The configuration's schema: one typed dataclass per section of the YAML file.

Every choice field is typed by a ``Literal`` alias below, the one place its allowed values are written: OmegaConf 2.4 enforces
Literal annotations when it merges the file, and ``flglm.config.validation`` reads the same aliases (``typing.get_args``) for its
messages and for configs built in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from omegaconf import MISSING

AttnImplementation = Literal["sdpa", "eager"]
PeftMethod = Literal["none", "lora", "ptuning_v2"]
OptimizerName = Literal["adamw", "sgd"]
SchedulerName = Literal["constant", "linear", "cosine"]
Parallelism = Literal["sequential", "client_batching", "hierarchical", "auto"]
NonfinitePolicy = Literal["reject", "skip"]
Membership = Literal["static", "dynamic"]
PrivateBlock = Literal["input", "output"]
# The task formats of ``flglm.data.read_task_file``, written here so that loading a config does not import the data layer (and
# transformers); tests/test_tasks.py checks they agree.
SuperGlueFormat = Literal["boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc"]
SummarizationFormat = Literal["cnn_dailymail", "xsum"]
FileFormat = Literal["json", "jsonl", "csv", "tsv", "text"]
"""The file layouts of ``flglm.data.formats``, whose fields any task names."""
DataFormat = Literal["auto", FileFormat, SuperGlueFormat, SummarizationFormat]
Partition = Literal["iid", "dirichlet", "none"]
TruncationSide = Literal["auto", "left", "right"]
TaskKind = Literal["classification", "generation", "language_modeling"]
GradientClipAlgorithm = Literal["norm", "value"]
WeightDtype = Literal["auto", "float32", "bfloat16", "float16"]
TokenizerKind = Literal["word", "byte_bpe", "bytes"]
MetricTokenizer = Literal["auto", "whitespace", "char", "model"]
LinkTransport = Literal["rpc", "socket"]
WireDtype = Literal["float32", "bfloat16", "float16", "int8"]
"""Precisions of hidden states and gradients on the link (``flglm.link.wire_precision``)."""

SUPERGLUE_FORMATS: tuple[str, ...] = get_args(SuperGlueFormat)
SUMMARIZATION_FORMATS: tuple[str, ...] = get_args(SummarizationFormat)
FILE_FORMATS: tuple[str, ...] = get_args(FileFormat)
DATA_FORMATS: tuple[str, ...] = ("auto", *FILE_FORMATS, *SUPERGLUE_FORMATS, *SUMMARIZATION_FORMATS)


@dataclass(kw_only=True)
class ModelConfig:
    path: str | None = None
    """Local directory with a Hugging Face causal LM (config + safetensors). Never downloaded."""
    config: dict[str, Any] = field(default_factory=dict)
    """A Hugging Face config dict (with ``model_type``) for a randomly initialised model."""
    init_seed: int = 0
    """Seed of the random initialisation; each parameter is drawn from its own name-keyed stream."""
    attn_implementation: AttnImplementation = "sdpa"
    """Attention kernel of every block."""
    dtype: WeightDtype = "float32"
    """Storage dtype of frozen weights: ``auto`` (the checkpoint's ``torch_dtype``; float32 for random init), ``float32``, ``bfloat16`` or ``float16``."""


@dataclass(kw_only=True)
class SplitConfig:
    client_head_layers: int = 1
    """Transformer blocks kept on the client after the embedding (the input block)."""
    client_tail_layers: int = 1
    """Transformer blocks kept on the client before the final norm and LM head (the output block)."""


@dataclass(kw_only=True)
class PeftConfig:
    method: PeftMethod = "none"
    """``none``: train every weight; ``lora``/``ptuning_v2``: base weights frozen on every side (README: "Fine-tuning methods")."""
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt (e.g. ``[q_proj, v_proj]``), or ``[all-linear]``: every linear layer
    of the blocks (not the LM head)."""
    prefix_length: int = 16
    """ptuning_v2: number of learned key/value positions in front of every block's attention."""
    prefix_projection: bool = False
    """ptuning_v2: make the prefixes with peft's two-layer MLP reparameterisation instead of learning them directly."""
    prefix_hidden_size: int = 256
    """ptuning_v2 with ``prefix_projection``: hidden width of that MLP."""


@dataclass(kw_only=True)
class OptimConfig:
    name: OptimizerName = "adamw"
    """The same optimizer runs on the client blocks and on the server."""
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0
    """SGD only."""
    scheduler: SchedulerName = "constant"
    """``linear``: warm-up then linear decay to 0."""
    warmup_steps: int = 0


@dataclass(kw_only=True)
class ServerConfig:
    device: str = "cpu"
    """Where the middle stack computes: ``auto`` (CUDA if available), ``cpu``, ``cuda`` (the local rank's GPU) or ``cuda:N``."""
    state_timeout_s: float = 300.0
    """A forward's autograd state is released if its backward has not come within this time."""
    max_pending_per_client: int = 8
    """At most this many forwards awaiting their backward are kept per client (oldest evicted)."""
    max_decode_sessions_per_client: int = 4
    """Open decoding sessions (middle-stack key/value caches) per client; least recently used freed first, idle ones after ``state_timeout_s``."""
    max_batch_size: int = 4096
    """Larger hidden-state batches are rejected before they touch the model."""
    rpc_timeout_s: float = 300.0
    """Timeout of every client-server call."""
    startup_timeout_s: float = 600.0
    """How long the server waits for every client to join, and a client for the server."""
    num_rpc_threads: int = 16
    num_threads: int = 0
    """Intra-op threads of a server process; 0: its share (cores // processes on this machine). More pays only with ``OMP_WAIT_POLICY=PASSIVE``."""
    parallelism: Parallelism = "sequential"
    """How the server serves several clients (README: "Serving many clients"); ``auto`` logs what it chose."""
    sub_servers: int = 1
    """hierarchical: server processes (torchrun ranks 0..S-1); sub-server ``s`` serves clients ``i`` with ``i % S == s``."""
    sync_every: int = 1
    """hierarchical: sample-weighted average of the sub-servers' middle stacks every this many FedAvg rounds, and at the end."""
    sync_step: float = 1.0
    """hierarchical: a sync sets ``anchor + sync_step * (average - anchor)`` (anchor: last synced weights); 1: FedAvg, S: changes add up."""
    sync_timeout_s: float = 86400.0
    """hierarchical: how long a sub-server waits for the others at one synchronisation (a finished one waits there)."""
    max_clients_per_batch: int = 8
    """client_batching: at most this many clients share one batch."""
    batch_window_ms: float = 50.0
    """client_batching: a group closes when every active client has asked, or this long after the first."""
    client_timeout_s: float = 600.0
    """A client silent (nothing sent, nothing being handled) this long is dropped (logged; the rest go on); it may join again."""
    rejoin_timeout_s: float = 0.0
    """How long after a drop the server stays open for that client to join again (else it ends when the others leave); 0: do not wait."""
    checkpoint_every: int = 0
    """Every party checkpoints every this many FedAvg rounds (rounds: the only points all parties agree on); 0: never."""
    checkpoint_keep: int = 2
    """Checkpoints each party keeps (at least 2: a party may be one round ahead when a crash comes)."""
    nonfinite: NonfinitePolicy = "reject"
    """NaN/Inf in a message: ``reject`` it (error, nothing changes) or ``skip`` it (logged, answered with zeros). Decoding always rejects."""
    request_timeout_s: float = 60.0
    """client_batching: a member silent this long within its group is dropped from it, so the others go on."""


@dataclass(kw_only=True)
class ClientConfig:
    device: str = "cpu"
    """Where each client's blocks compute: ``auto``, ``cpu``, ``cuda`` (the local rank's GPU) or ``cuda:N``."""


@dataclass(kw_only=True)
class FederationConfig:
    num_clients: int = 1
    """Client processes; torchrun starts ``num_clients + server.sub_servers`` (the first rank(s) serve)."""
    aggregate_every: int = 0
    """FedAvg of the client blocks every this many optimizer steps; 0: only at each epoch end."""
    max_retries: int = 3
    """Resends of a message whose answer did not come (the server answers a resend from its record); 0: fail at the first loss."""
    retry_backoff_s: float = 0.5
    """Wait before the first resend; doubled before each further one."""
    retry_backoff_max_s: float = 10.0
    """Longest wait between two resends."""
    membership: Membership = "static"
    """``static``: one torchrun world; ``dynamic``: each process started on its own, clients may die and rejoin (one server; README: "When things fail")."""


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
    """The server SIGKILLs itself right after its optimizer step N, in its first start only; 0: never."""
    kill_client_at_step: int = 0
    """Client ``kill_client`` SIGKILLs itself between the forward and the backward of its step N + 1; 0: never (not fingerprinted)."""
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
    narrow_uploads: bool = True
    """Secure aggregation: a round whose participants all have values that fit (``|w * x| < 2**7 / N``
    at 24 fractional bits, N listed clients) sends its masked uploads as int32, half the bytes, with the
    same average bit for bit. The server learns per client and round whether its values fit: one bit."""
    max_message_mb: float = 1024.0
    """Larger sealed messages are refused before anything is decrypted or allocated."""


PRIVATE_BLOCKS: tuple[str, ...] = get_args(PrivateBlock)
"""The client's parts that ``privacy.private_blocks`` may keep private."""


@dataclass(kw_only=True)
class LinkConfig:
    transport: LinkTransport = "rpc"
    """``rpc``: torch RPC among processes torchrun starts (one organisation); ``socket``: clients reach the server's edge by TCP frames only."""
    edge_host: str = "127.0.0.1"
    """socket: the address the server's edge listens on (``0.0.0.0`` to accept other machines)."""
    edge_port: int = 0
    """socket: the edge's port; 0 picks a free one, written to ``run_dir/edge.json``."""
    max_frame_mb: float = 1024.0
    """socket: larger frames are refused before anything is allocated."""
    first_frame_timeout_s: float = 10.0
    """socket: a connection not yet proven by a sealed message is closed if a frame does not come within this time."""
    max_connections: int = 256
    """socket: connections the edge holds at once; when full, the oldest one not yet proven is closed."""
    max_connections_per_client: int = 4
    """socket: proven connections kept per client (the oldest is closed first)."""
    wire_dtype: WireDtype = "float32"
    """Precision of the hidden states and gradients that cross (both ways): ``float32`` sends them as computed
    (exact); ``bfloat16``/``float16`` round each element (half the bytes); ``int8`` is blockwise absmax
    quantisation, one float32 scale per 64 values (about a quarter). Applied after the privacy defences."""


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
    """Gaussian noise of norm ≈ ``hidden_noise * s`` on each sent token vector x (s = ``hidden_clip`` or ||x||); always applied."""
    grad_clip: float = 0.0
    """Per-token L2 bound of the gradient the client returns for the server's output (0: none)."""
    grad_noise: float = 0.0
    """Gaussian noise on each returned gradient token vector, as ``hidden_noise`` (s = ``grad_clip`` or ||g||)."""
    noise_seed: int | None = None
    """None (secure): a secret random state per client; an int only for reproducible tests (client ``i``: ``noise_seed + i``, not secret)."""
    private_blocks: list[str] = field(default_factory=list)
    """Client parts (``PRIVATE_BLOCKS``) left out of FedAvg, so they never leave the client (tied embeddings: private if either part is)."""
    secret_init: bool = False
    """Re-draw the private blocks from a secret random init at start (needs ``peft.method=none``; discards pretrained weights)."""


@dataclass(kw_only=True)
class DataConfig:
    train_path: str = MISSING
    """Training file (.json array, .jsonl, .csv, .tsv with a header, .txt); ``{client}`` is replaced by the client index."""
    dev_path: str | None = None
    """Validation file, evaluated by every client through the split; ``{client}`` as in ``train_path``."""
    text_field: str = "sentence"
    """classification and language modelling: the field holding the text."""
    label_field: str | None = "label"
    """classification: the field holding the integer label (None: unlabelled)."""
    prompt_field: str | None = None
    """generation: the field holding the prompt (source); None: ``article`` or ``document``."""
    target_field: str | None = None
    """generation: the field holding the target; None: ``summary`` or ``highlights``."""
    format: DataFormat = "auto"
    """``auto``: by suffix (``.txt``: plain text cut into ``max_length`` token blocks); a file layout; a SuperGLUE task; a summarization set."""
    partition: Partition = "iid"
    """How one training file is divided among clients; ``none``: each client's ``train_path`` is its own file."""
    alpha: float = 0.5
    """Dirichlet concentration for ``partition=dirichlet`` (smaller: more skewed labels)."""
    max_train_rows: int | None = None
    """Use only the first N rows of the training file (a stated subset for quick experiments)."""
    max_dev_rows: int | None = None
    max_length: int = 64
    """Token budget of one example (prompt words and, for generation, the target included);
    longer texts are truncated on ``truncation_side``."""
    truncation_side: TruncationSide = "auto"
    """``right`` keeps a long text's start, ``left`` its end; ``auto``: left for SuperGLUE (``answer:`` is last), else right."""
    batch_size: int = 16
    eval_batch_size: int = 64
    tokenizer: TokenizerKind = "word"
    """Tokenizer of a random-init model: ``word`` (lower-cased words; unknowns), ``byte_bpe`` or ``bytes`` (exact, any script)."""
    tokenizer_path: str | None = None
    """A saved tokenizer directory (``flglm tokenizer`` on public text); if unset, ``word``/``byte_bpe`` train on the training file."""
    tokenizer_vocab_size: int = 2000
    """Vocabulary size (specials included) of a ``word`` or ``byte_bpe`` tokenizer trained for a random-init model."""
    shuffle: bool = True


@dataclass(kw_only=True)
class TaskConfig:
    kind: TaskKind = "classification"
    """``classification``: prompt + verbalizer; ``generation``: prompt -> target, loss on the target, ROUGE/BLEU at validation."""
    prompt: str | None = None
    """Template with ``{text}``; None: ``{text}`` (SuperGLUE), ``{text} summary :`` (generation), else ``{text} sentiment :``."""
    label_words: list[str] | None = None
    """One word per label, scored after the prompt; None: the SuperGLUE task's words (boolq ``[no, yes]``), else ``[negative, positive]``."""
    max_target_tokens: int = 32
    """generation: tokens of ``data.max_length`` kept for the target (end token included); also caps tokens generated at validation."""
    metric_tokenizer: MetricTokenizer = "auto"
    """generation: ROUGE/BLEU tokens: ``auto`` (CJK one per character, else whitespace), ``whitespace``, ``char``, ``model``."""
    max_eval_generations: int = 32
    """generation: dev examples decoded per validation for ROUGE/BLEU (the loss covers all); 0: none."""
    chat_template: bool = False
    """Wrap every prompt (the task's, and ``flglm generate``'s) in the tokenizer's chat template as the user's turn."""
    factory: str | None = None
    """``package.module:function`` returning ``(task module, collate)`` like ``flglm.tasks.build_task`` (README: "Writing your own task")."""


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
    """Prompts decoded together; a longer list runs in batches of this many (batch ``k`` samples with ``seed + k``)."""


@dataclass(kw_only=True)
class TrainerConfig:
    max_epochs: int = 1
    max_steps: int = -1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: GradientClipAlgorithm = "norm"
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
    """Continue from the newest checkpoint round every party has (fresh if none); set it from the first start for ``torchrun --max-restarts``."""
    overwrite: bool = False
    """Start on a run_dir holding a finished run (summary.json): the old run is moved aside to ``RUN_DIR.old-<UTC time>``."""
    model: ModelConfig = field(default_factory=ModelConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
