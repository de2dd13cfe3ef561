"""Lightning callbacks of flglm (installed as ``flglm.callbacks``)."""

from flglm.callbacks.encryption import EncryptionCallback
from flglm.callbacks.fedavg import FedAvgCallback

__all__ = ["EncryptionCallback", "FedAvgCallback"]
