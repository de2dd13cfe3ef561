"""The federation's configuration: one typed schema (``schema``), its checks (``validation``), one loader (``loading``).

A single YAML file describes the whole federation (model, split, server, clients, data, trainer). Server and clients read the same
file, so they cannot disagree; the server also compares a fingerprint of it at each client's handshake.
"""

from flglm.config.loading import fingerprint, load_config, to_dict, to_yaml
from flglm.config.schema import (
    DATA_FORMATS,
    FILE_FORMATS,
    PRIVATE_BLOCKS,
    SUMMARIZATION_FORMATS,
    SUPERGLUE_FORMATS,
    ClientConfig,
    CryptoConfig,
    DataConfig,
    FaultsConfig,
    FederationConfig,
    GenerationConfig,
    LinkConfig,
    ModelConfig,
    OptimConfig,
    PeftConfig,
    PrivacyConfig,
    RunConfig,
    ServerConfig,
    SplitConfig,
    TaskConfig,
    TrainerConfig,
)
from flglm.config.validation import CHOICES, ConfigError, validate

__all__ = [
    "CHOICES",
    "DATA_FORMATS",
    "FILE_FORMATS",
    "PRIVATE_BLOCKS",
    "SUMMARIZATION_FORMATS",
    "SUPERGLUE_FORMATS",
    "ClientConfig",
    "ConfigError",
    "CryptoConfig",
    "DataConfig",
    "FaultsConfig",
    "FederationConfig",
    "GenerationConfig",
    "LinkConfig",
    "ModelConfig",
    "OptimConfig",
    "PeftConfig",
    "PrivacyConfig",
    "RunConfig",
    "ServerConfig",
    "SplitConfig",
    "TaskConfig",
    "TrainerConfig",
    "fingerprint",
    "load_config",
    "to_dict",
    "to_yaml",
    "validate",
]
