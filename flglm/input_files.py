"""The data files a client process will read, by path, checked before it imports the training
stack: a missing file then fails in a second, not after the start-up (Lightning, the model, the
handshake) that costs most of a short run's time. The files' contents are read later, once the
server's key is proven (:func:`flglm.jobs.train.run_client`). Every reader of a data file
makes the same check first (:func:`require_file`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flglm.config import RunConfig


def client_path(template: str, client_index: int) -> str:
    """A data path with ``{client}`` replaced by the client's index."""
    return template.replace("{client}", str(client_index))


def require_file(path: str | Path, what: str) -> None:
    """Raise :class:`FileNotFoundError` ``"<what> not found: <path>"`` (or ``is not a file``)
    unless ``path`` is a file: the one check every reader and the start-up check make."""
    if not Path(path).is_file():
        reason = "is not a file" if Path(path).exists() else "not found"
        raise FileNotFoundError(f"{what} {reason}: {path}")


def client_input_files(cfg: RunConfig, client_index: int) -> list[tuple[str, str]]:
    """``(setting, path)`` of every data file client ``client_index`` reads: the training file
    (its own under a ``{client}`` placeholder, which the config allows only with
    ``data.partition=none``; else the one file its share is cut from) and its validation file."""
    files = [("data.train_path", client_path(cfg.data.train_path, client_index))]
    if cfg.data.dev_path is not None:
        files.append(("data.dev_path", client_path(cfg.data.dev_path, client_index)))
    return files


def check_client_inputs(cfg: RunConfig, client_index: int) -> None:
    """Raise :class:`FileNotFoundError` naming the setting and the path of the first data file
    of this client's that is not there (or is not a file)."""
    for setting, path in client_input_files(cfg, client_index):
        require_file(path, f"{setting}: file")
