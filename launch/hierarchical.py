"""Start one process of a federation with a hierarchical server; torchrun starts them all.

Ranks 0..S-1 are sub-servers (``--sub-servers S``), each with its own replica of the middle
stack; the other ranks are clients, client ``i`` served by sub-server ``i % S``. Roles are
assigned in one place (``flglm.roles``); the sub-servers synchronise with collectives among
themselves (gloo), the clients talk to their sub-server over RPC.

One machine, 2 sub-servers + 4 clients (keys for 4 clients: ``flglm keygen --dir runs/h/keys --clients 4``):
    torchrun --standalone --nproc-per-node=6 launch/hierarchical.py --sub-servers 2 \\
        --config configs/demo.yaml federation.num_clients=4 crypto.key_dir=runs/h/keys run_dir=runs/h

Several machines (the first S ranks are sub-servers; run one line per node):
    torchrun --nnodes=2 --nproc-per-node=3 --node-rank=0 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29400 launch/hierarchical.py --sub-servers 2 --config ... federation.num_clients=4
"""

import argparse
import sys

from flglm.cli import train_main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--sub-servers", type=int, required=True, help="number of sub-server processes (S >= 1)")
    known, rest = parser.parse_known_args()
    if known.sub_servers < 1:
        print(f"flglm: error: --sub-servers must be >= 1, got {known.sub_servers}", file=sys.stderr)
        return 2
    return train_main([*rest, f"server.sub_servers={known.sub_servers}", "server.parallelism=hierarchical"])


if __name__ == "__main__":
    sys.exit(main())
