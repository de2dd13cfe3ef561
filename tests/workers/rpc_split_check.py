"""Worker of tests/test_rpc_split.py: split == whole model over real RPC, for every architecture.

    torchrun --standalone --nproc-per-node=2 tests/workers/rpc_split_check.py

Rank 0 serves one MiddleServer per architecture; rank 1 runs each split model through the
server over RPC and compares logits and every parameter's gradient with the whole model.
Prints one JSON line with the largest differences; exits non-zero on a mismatch. The same
check with narrower ``link.wire_dtype`` (bfloat16, int8) for one architecture reports its
differences under ``wires`` (bounded in the test, not here): the narrowed tensors over real RPC.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed import rpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import TINY_MODEL_CONFIGS

from flglm.client.lm import SplitCausalLM
from flglm.client.remote import RemoteMiddle
from flglm.client.server_link import ServerLink
from flglm.config import ModelConfig, RunConfig, fingerprint
from flglm.distributed import configure_threads, read_env, rpc_options
from flglm.models import ClientBlocks, build_full_model, plan_split
from flglm.server.endpoint import ServerEndpoint
from flglm.server.middle_server import MiddleServer

_SERVERS: dict[str, MiddleServer] = {}
_ENDPOINTS: dict[str, ServerEndpoint] = {}


NARROW_WIRES = ("bfloat16", "int8")
WIRE_ARCH = "llama"


def _config(arch: str, wire_dtype: str = "float32") -> RunConfig:
    cfg = RunConfig()
    cfg.model = ModelConfig(config=dict(TINY_MODEL_CONFIGS[arch]))
    cfg.data.train_path = "unused"
    cfg.link.wire_dtype = wire_dtype
    return cfg


def _name(arch: str, wire_dtype: str) -> str:
    return arch if wire_dtype == "float32" else f"{arch}/{wire_dtype}"


def endpoint_for(name: str) -> ServerEndpoint:
    return _ENDPOINTS[name]


def server_grads(name: str) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in _SERVERS[name].middle.hf.named_parameters() if p.grad is not None}


def check(arch: str, wire_dtype: str = "float32") -> dict[str, float]:
    cfg, name = _config(arch, wire_dtype), _name(arch, wire_dtype)
    link = ServerLink(rpc.remote("server", endpoint_for, args=(name,)), client_id=0, timeout_s=60, wire_dtype=wire_dtype)
    info = link.hello(fingerprint(cfg), "test")
    lm = SplitCausalLM(ClientBlocks(cfg.model, plan_split(4, client_head_layers=1, client_tail_layers=1)), RemoteMiddle(link, server_info=info))
    full = build_full_model(cfg.model)
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4, [1] * 3 + [0] * 7])
    ids = torch.randint(3, 128, mask.shape, generator=gen).masked_fill(mask == 0, 0)
    weights = torch.randn(3, 10, 128, generator=gen) * mask.unsqueeze(-1)
    split_logits = lm(ids, mask)
    full_logits = full(input_ids=ids, attention_mask=mask, position_ids=torch.arange(10).expand(3, 10)).logits
    (split_logits * weights).sum().backward()
    (full_logits * weights).sum().backward()
    grads = {n: p.grad for n, p in lm.blocks.hf.named_parameters()}
    grads.update(rpc.rpc_sync("server", server_grads, args=(name,)))
    full_grads = {n: p.grad for n, p in full.named_parameters()}
    assert sorted(grads) == sorted(full_grads), (arch, sorted(set(grads) ^ set(full_grads)))
    link.leave({})
    return {
        "logits": float((split_logits - full_logits).abs().max()),
        "grads": max(float((grads[n] - full_grads[n]).abs().max()) for n in full_grads),
        "grad_scale": max(float(g.abs().max()) for g in full_grads.values()),
    }


def refused_join_error() -> str:
    """A join with another config: the server's error must reach the caller as a raised error.

    (An error the server delivers through a future arrives over an RRef as the exception
    object itself; the link must raise it, not hand it on as a reply.)"""
    arch = next(iter(TINY_MODEL_CONFIGS))
    link = ServerLink(rpc.remote("server", endpoint_for, args=(arch,)), client_id=5, timeout_s=60)
    try:
        link.hello("not-the-servers-fingerprint", "test")
    except ValueError as exc:
        return f"ValueError: {exc}"
    except Exception as exc:  # noqa: BLE001 - reported as the wrong kind of failure
        return f"{type(exc).__name__}: {exc}"
    return "accepted"


def main() -> int:
    env = read_env()
    configure_threads(env.local_world_size)
    opts = rpc_options(num_worker_threads=8, timeout_s=120)
    if env.rank == 0:
        for arch, wire_dtype in [(a, "float32") for a in TINY_MODEL_CONFIGS] + [(WIRE_ARCH, w) for w in NARROW_WIRES]:
            name = _name(arch, wire_dtype)
            _SERVERS[name] = MiddleServer(_config(arch, wire_dtype))
            _ENDPOINTS[name] = ServerEndpoint(_SERVERS[name])
        rpc.init_rpc("server", rank=0, world_size=2, rpc_backend_options=opts)
        for server in _SERVERS.values():
            server.wait_until_done(timeout=120)
        rpc.shutdown()
        return 0
    rpc.init_rpc("client0", rank=1, world_size=2, rpc_backend_options=opts)
    refused = refused_join_error()
    results = {arch: check(arch) for arch in TINY_MODEL_CONFIGS}
    wires = {wire_dtype: check(WIRE_ARCH, wire_dtype) for wire_dtype in NARROW_WIRES}
    rpc.shutdown()
    print(json.dumps(results | {"refused_join": refused, "wires": wires}))
    worst = max(max(r["logits"], r["grads"]) for r in results.values())
    if not refused.startswith("ValueError"):
        return 1
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
