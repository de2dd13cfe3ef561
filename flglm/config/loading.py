"""Loading the configuration: YAML file + ``key=value`` overrides -> a validated :class:`RunConfig`, and back to plain data.

The file is checked against the schema (OmegaConf structured config) before any process starts work; server and clients compare
the :func:`fingerprint` of what they loaded at each client's handshake.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from flglm.config.schema import RunConfig
from flglm.config.validation import CHOICES, ConfigError, choice_error, validate


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
        if isinstance(err, ValidationError) and key in CHOICES:  # a Literal field: say which values it takes
            raise ConfigError(choice_error(key, err.value)) from None
        where = f" (key: {key})" if key else ""
        reason = str(getattr(err, "msg", err)).splitlines()[0]  # OmegaConf appends key/type lines
        raise ConfigError(f"invalid configuration{where}: {reason}") from None
    validate(cfg)
    return cfg


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain containers (for logging, hashing and saving with the run)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def fingerprint(cfg: RunConfig) -> str:
    """A hash of everything server and clients must agree on.

    ``run_dir`` and ``crypto.key_dir`` are left out (each machine keeps its files elsewhere), and
    so are ``link.edge_host``/``edge_port`` (each server process binds its own machine's address;
    a client is given it with ``--server``); so are the devices (``server.device``, ``client.device``), the trainer's display setting, the client's decoding settings and the test-only fault
    injection: none changes what the server computes. ``privacy`` stays in: its private blocks
    set the length of the FedAvg vector, which every client must agree on.
    """
    shared = to_dict(cfg)
    shared.pop("run_dir")
    shared.pop("resume")
    shared.pop("overwrite")
    shared.pop("generation")
    shared.pop("faults")
    shared.pop("client")  # where a process computes is its own machine's business
    shared["server"].pop("device")
    shared["crypto"].pop("key_dir")
    shared["link"].pop("edge_host")
    shared["link"].pop("edge_port")
    shared["trainer"].pop("enable_progress_bar")
    blob = json.dumps(shared, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A command line that takes the federation's YAML file and ``key=value`` overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="the federation's YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_epochs=2")
    return parser
