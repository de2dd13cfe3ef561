"""Start one process of a federation; torchrun starts them all.

One machine (server + 2 clients):
    torchrun --standalone --nproc-per-node=3 launch/train.py --config configs/demo.yaml

Several machines (rank 0, on the first node, is the server):
    torchrun --nnodes=2 --nproc-per-node=2 --node-rank=0 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29400 launch/train.py --config configs/demo.yaml
"""

import sys

from flglm.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
