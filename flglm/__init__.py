"""flglm: federated split-learning fine-tuning of causal language models (FL-GLM)."""

__version__ = "0.1.0"
