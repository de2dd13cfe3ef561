"""Where each process finds its keys: one directory, fixed file names.

``key_dir`` holds ``server.key`` on the server, ``client{i}.key`` on client ``i`` (private,
mode 0600), and the public keys of every party: ``server.pub`` (clients pin it) and
``client{i}.pub`` for each allowed client (the server accepts exactly these; clients use
their peers' keys for the pairwise masks of secure aggregation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flglm.crypto.keys import generate_identity, load_identity, load_public_key


class MissingKeyError(FileNotFoundError):
    """A key file the configuration needs is not there."""


def _name(role: str, client: int | None = None) -> str:
    return "server" if role == "server" else f"client{client}"


def _need(path: Path, key_dir: Path, num_clients: int) -> Path:
    if not path.is_file():
        raise MissingKeyError(
            f"key file {path} not found (crypto.key_dir={key_dir}); create a set with "
            f"`flglm keygen --dir {key_dir} --clients {num_clients}` or turn encryption off with crypto.enabled=false"
        )
    return path


@dataclass(frozen=True)
class ServerKeys:
    identity: X25519PrivateKey
    client_keys: dict[int, bytes]
    """Allowed client id -> its static public key."""


@dataclass(frozen=True)
class ClientKeys:
    identity: X25519PrivateKey
    server_key: bytes
    """The pinned server public key."""
    peer_keys: dict[int, bytes]
    """Every other client's public key (pairwise masks)."""


def load_server_keys(key_dir: str | Path, num_clients: int) -> ServerKeys:
    key_dir = Path(key_dir)
    identity = load_identity(_need(key_dir / "server.key", key_dir, num_clients))
    clients = {i: load_public_key(_need(key_dir / f"client{i}.pub", key_dir, num_clients)) for i in range(num_clients)}
    return ServerKeys(identity, clients)


def load_client_keys(key_dir: str | Path, client: int, num_clients: int) -> ClientKeys:
    key_dir = Path(key_dir)
    identity = load_identity(_need(key_dir / f"client{client}.key", key_dir, num_clients))
    server = load_public_key(_need(key_dir / "server.pub", key_dir, num_clients))
    peers = {i: load_public_key(_need(key_dir / f"client{i}.pub", key_dir, num_clients)) for i in range(num_clients) if i != client}
    return ClientKeys(identity, server, peers)


def generate_key_set(key_dir: str | Path, num_clients: int) -> list[Path]:
    """Write identities for a server and ``num_clients`` clients; existing files are kept, not overwritten."""
    key_dir = Path(key_dir)
    key_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ["server", *(f"client{i}" for i in range(num_clients))]:
        path = key_dir / f"{name}.key"
        if path.exists() and path.with_suffix(".pub").exists():
            continue
        generate_identity(path)
        written.append(path)
    return written
