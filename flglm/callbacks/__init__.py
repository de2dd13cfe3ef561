"""Lightning callbacks of flglm (installed as ``flglm.callbacks``)."""

from flglm.callbacks.encryption import EncryptionCallback
from flglm.callbacks.fedavg import FedAvgCallback
from flglm.callbacks.training_state import TrainingStateCallback

__all__ = ["EncryptionCallback", "FedAvgCallback", "TrainingStateCallback"]
