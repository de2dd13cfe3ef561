"""Identity key files: a raw 32-byte X25519 private key (mode 0600) and its public key as hex text."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

KEY_BYTES = 32
"""Length of a raw X25519 private or public key."""


def public_key_bytes(private_key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``private_key``."""
    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def generate_identity(path: Path | str) -> bytes:
    """Write a new private key to ``path`` (mode 0600) and its public key to ``path.with_suffix('.pub')``.

    Refuses to overwrite either file. Returns the raw public key.
    """
    path = Path(path)
    pub_path = path.with_suffix(".pub")
    for existing in (path, pub_path):
        if existing.exists():
            raise FileExistsError(errno.EEXIST, f"refusing to overwrite existing key file {existing}", str(existing))
    private_key = X25519PrivateKey.generate()
    raw = private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"refusing to overwrite existing key file {path}", str(path)) from None
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    public = public_key_bytes(private_key)
    try:
        fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"refusing to overwrite existing key file {pub_path}", str(pub_path)) from None
    with os.fdopen(fd, "w") as f:
        f.write(public.hex() + "\n")
    return public


def load_identity(path: Path | str) -> X25519PrivateKey:
    """Read a private key written by :func:`generate_identity`; refuse a file group or others can access."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"private key file {path} does not exist", str(path)) from None
    with os.fdopen(fd, "rb") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if mode & 0o077:
            raise PermissionError(
                errno.EACCES,
                f"private key file {path} has mode {mode:#o}, accessible by group or others; run: chmod 600 {path}",
                str(path),
            )
        raw = f.read(KEY_BYTES + 1)
    if len(raw) != KEY_BYTES:
        raise ValueError(f"private key file {path} holds {len(raw)} bytes, expected {KEY_BYTES} raw bytes")
    return X25519PrivateKey.from_private_bytes(raw)


def _parse_hex_key(text: str) -> bytes | None:
    text = text.strip()
    if len(text) != 2 * KEY_BYTES:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None


def load_public_key(hex_or_path: str | Path) -> bytes:
    """A raw 32-byte public key from 64 hex characters or from a ``.pub`` file holding them."""
    if isinstance(hex_or_path, str):
        key = _parse_hex_key(hex_or_path)
        if key is not None:
            return key
    path = Path(hex_or_path)
    if path.is_file():
        text = path.read_text(encoding="ascii", errors="replace")
        key = _parse_hex_key(text)
        if key is None:
            raise ValueError(f"public key file {path} does not hold {2 * KEY_BYTES} hex characters")
        return key
    raise ValueError(f"{str(hex_or_path)!r} is neither {2 * KEY_BYTES} hex characters (a 32-byte X25519 public key) nor an existing public key file")
