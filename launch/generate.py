"""Generate text through a trained split model: rank 0 serves the middle stack, rank 1 is the
client with its blocks and the prompts. ``flglm generate`` starts this itself; under torchrun:

    torchrun --standalone --nproc-per-node=2 launch/generate.py \\
        --config runs/demo/config.yaml --prompt "the movie was"

Across two machines, use torchrun's multi-node flags as for training (rank 0: the server).
"""

import sys

from flglm.cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
