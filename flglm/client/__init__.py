"""Client side: the LM a task trains (split or whole) and the LightningModule base class."""

from flglm.client.lm import FullCausalLM, SplitCausalLM
from flglm.client.module import SplitClientModule

__all__ = ["FullCausalLM", "SplitCausalLM", "SplitClientModule"]
