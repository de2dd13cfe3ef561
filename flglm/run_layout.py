"""Where a run keeps its files: one place, so training, export and generation agree.

Light on purpose (no torch import): command-line front ends check paths before starting jobs.
"""

from __future__ import annotations

from pathlib import Path


def middle_weights_path(run_dir: str | Path) -> Path:
    """The server's middle stack (all weights, or the adapters of a LoRA run)."""
    return Path(run_dir) / "server" / "middle.safetensors"


def client_weights_path(run_dir: str | Path, client_index: int) -> Path:
    """Client ``client_index``'s blocks (equal for every client after the final FedAvg)."""
    return Path(run_dir) / f"client{client_index}" / "client_blocks.safetensors"


def tokenizer_dir(run_dir: str | Path) -> Path:
    """The tokenizer a random-init run trained and saved (client 0 writes it)."""
    return Path(run_dir) / "tokenizer"


def loading_report_path(run_dir: str | Path, party: str) -> Path:
    """Which shards and tensors of a pretrained checkpoint ``party`` (``server``, ``client{i}``) read."""
    return Path(run_dir) / party / "loading.json"


def checkpoint_dir(run_dir: str | Path, party: str) -> Path:
    """Checkpoints of one party (``server`` or ``client{i}``), one file per FedAvg round."""
    return Path(run_dir) / "checkpoints" / party


def server_memory_path(run_dir: str | Path) -> Path:
    """JSON lines of the server's resident memory at each checkpoint (one line per checkpoint, any process)."""
    return Path(run_dir) / "server" / "memory.jsonl"


def rendezvous_path(run_dir: str | Path) -> Path:
    """Where the server of a dynamic federation writes its rendezvous store's address."""
    return Path(run_dir) / "rendezvous.json"


def edge_address_path(run_dir: str | Path, server_index: int = 0) -> Path:
    """Where a server of a socket-link federation writes its edge's address (``link.edge_port=0``: a
    free port): ``edge.json``, and for hierarchical sub-server ``i > 0``, ``edge-i.json``."""
    return Path(run_dir) / ("edge.json" if server_index == 0 else f"edge-{server_index}.json")


def generation_edge_path(run_dir: str | Path) -> Path:
    """Where a generation job's server (``flglm generate``, ``link.transport=socket``) writes its edge's address."""
    return Path(run_dir) / "generate" / "edge.json"


def generation_summary_path(run_dir: str | Path) -> Path:
    """What a generation job's server served (counts; over the socket link its edge's too)."""
    return Path(run_dir) / "generate" / "server-summary.json"


def summary_path(run_dir: str | Path) -> Path:
    """The federation's summary: the server writes it last, so it marks a finished run."""
    return Path(run_dir) / "summary.json"
