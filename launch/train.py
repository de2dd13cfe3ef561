"""Start one process of a federation; torchrun starts them all (or you start each one).

One machine (server + 2 clients):
    torchrun --standalone --nproc-per-node=3 launch/train.py --config configs/demo.yaml

Several machines (rank 0, on the first node, is the server):
    torchrun --nnodes=2 --nproc-per-node=2 --node-rank=0 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29400 launch/train.py --config configs/demo.yaml

Without torchrun, each process on its own (federation.membership=dynamic: a client may die and
be started again while the others go on); the server (rank 0) first, on a free port it writes to
run_dir/rendezvous.json (MASTER_PORT=0), then client i as rank 1+i with that port:
    RANK=0 WORLD_SIZE=3 MASTER_ADDR=127.0.0.1 MASTER_PORT=0 python launch/train.py \\
        --config configs/demo.yaml federation.membership=dynamic server.rejoin_timeout_s=600
    RANK=1 WORLD_SIZE=3 MASTER_ADDR=127.0.0.1 MASTER_PORT=<port from rendezvous.json> python launch/train.py \\
        --config configs/demo.yaml federation.membership=dynamic server.rejoin_timeout_s=600
"""

import sys

from flglm.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
