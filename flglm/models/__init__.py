"""Model splitting: architecture adapters and the client/server parts of a causal LM."""

from flglm.models.adapters import ADAPTERS, UnsupportedModelError, adapter_for
from flglm.models.split import (
    ClientBlocks,
    MiddleStack,
    SplitError,
    SplitPlan,
    build_full_model,
    load_hf_config,
    plan_split,
)

__all__ = [
    "ADAPTERS",
    "ClientBlocks",
    "MiddleStack",
    "SplitError",
    "SplitPlan",
    "UnsupportedModelError",
    "adapter_for",
    "build_full_model",
    "load_hf_config",
    "plan_split",
]
