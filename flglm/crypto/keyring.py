"""Where each process finds its keys: one directory, fixed file names.

``key_dir`` holds ``server.key`` on the server, ``client{i}.key`` on client ``i`` (private,
mode 0600), and the public keys of every party: ``server.pub`` (clients pin it) and
``client{i}.pub`` for each allowed client (the server accepts exactly these; clients use
their peers' keys for the pairwise masks of secure aggregation). The public keys may
instead be listed in the config (``crypto.server_public_key``, ``crypto.client_public_keys``),
which puts them under the config fingerprint every party compares at join.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        raise MissingKeyError(f"key file {path} not found (crypto.key_dir={key_dir}); {_advice(path, key_dir, num_clients)}")
    return path


def _advice(path: Path, key_dir: Path, num_clients: int) -> str:
    """A command that works here: the whole set only into an empty key_dir (keygen never
    overwrites), else this one identity (a .pub is another party's: it sends it)."""
    off = "or turn encryption off with crypto.enabled=false"
    if not key_dir.is_dir() or not any(key_dir.glob("*.key")) and not any(key_dir.glob("*.pub")):
        return f"create a set with `flglm keygen --dir {key_dir} --clients {num_clients}` {off}"
    private = path.with_suffix(".key")
    if path.suffix == ".pub" and private.exists():
        return f"{private} exists without its public key: move it aside and run `flglm keygen --out {private}`, {off}"
    if path.suffix == ".pub":
        return (
            f"copy {path.name} from the party that holds {private.name} (it creates one with `flglm keygen --out {private.name}`), "
            f"list it in the config instead, {off}"
        )
    public = path.with_suffix(".pub")
    if public.exists():
        return (
            f"{public.name} is here without its private key: copy {path.name} from where it was made, or make a new identity with "
            f"`rm {public} && flglm keygen --out {path}` and give the new {public.name} to the other parties, {off}"
        )
    return f"create this identity with `flglm keygen --out {path}` (and give its .pub to the other parties) {off}"


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


def _public(listed: str | None, key_dir: Path, name: str, num_clients: int) -> bytes:
    """A public key listed in the config (hex or path), else ``key_dir/<name>.pub``."""
    if listed:
        return load_public_key(listed)
    return load_public_key(_need(key_dir / f"{name}.pub", key_dir, num_clients))


def _client_publics(key_dir: Path, num_clients: int, listed: Sequence[str]) -> dict[int, bytes]:
    return {i: _public(listed[i] if listed else None, key_dir, _name("client", i), num_clients) for i in range(num_clients)}


def load_server_keys(key_dir: str | Path, num_clients: int, *, client_public_keys: Sequence[str] = ()) -> ServerKeys:
    key_dir = Path(key_dir)
    identity = load_identity(_need(key_dir / "server.key", key_dir, num_clients))
    return ServerKeys(identity, _client_publics(key_dir, num_clients, client_public_keys))


def load_client_keys(
    key_dir: str | Path,
    client: int,
    num_clients: int,
    *,
    server_public_key: str | None = None,
    client_public_keys: Sequence[str] = (),
) -> ClientKeys:
    key_dir = Path(key_dir)
    identity = load_identity(_need(key_dir / f"client{client}.key", key_dir, num_clients))
    server = _public(server_public_key, key_dir, "server", num_clients)
    peers = {i: key for i, key in _client_publics(key_dir, num_clients, client_public_keys).items() if i != client}
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
