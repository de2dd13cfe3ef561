"""Generation as a two-process job: the trained model stays split.

The server process holds the trained middle stack (``run_dir/server/middle.safetensors``),
the client process its trained blocks (``run_dir/client{i}/client_blocks.safetensors``),
the tokenizer and the prompts. Hidden states cross the same link as in training, encrypted
under the client's keys, and the server keeps only a per-session key/value cache, so the
prompts and generated text never leave the client. ``flglm generate`` starts this job with
torchrun (or runs one of its processes when torchrun started it). With ``link.transport=socket``
neither process runs torch RPC: the server listens on an edge (its address in
``run_dir/generate/edge.json``) and the client connects to it, as in training; each side may
also run on its own (``flglm generate --serve`` / ``--server HOST:PORT``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed import rpc

from flglm.client.lm import SplitCausalLM
from flglm.client.module import SplitClientModule
from flglm.client.remote import RemoteMiddle
from flglm.config import RunConfig, fingerprint
from flglm.data import load_tokenizer, tokenizer_fingerprint
from flglm.data.loading import build_tokenizer
from flglm.devices import resolve_device
from flglm.distributed import DistEnv, rpc_options, rpc_worker
from flglm.jobs.serve import server_sessions
from flglm.jobs.train import client_link, client_session
from flglm.link import rpc_entries
from flglm.models.split import ClientBlocks, MiddleStack, plan_for, saved_state_dict
from flglm.privacy.defenses import client_defenses
from flglm.roles import Role
from flglm.run_layout import client_weights_path, generation_edge_path, generation_summary_path, middle_weights_path, tokenizer_dir
from flglm.server.endpoint import ServerEndpoint
from flglm.server.middle_server import MiddleServer
from flglm.tasks import prompt_rows
from flglm.tensor_files import load_tensors, write_json

log = logging.getLogger("flglm")


def load_trained(model: nn.Module, path: str | Path) -> None:
    """Load a side's saved weights (every tensor, or the adapters of a LoRA run) onto ``model``.

    Raises:
        ValueError: the file holds other tensors than the ones this side saves (another split,
            another model or another PEFT method), naming some of them.
    """
    tensors = load_tensors(path)
    expected = set(saved_state_dict(model))
    tied = {n for n in expected - set(tensors) if n.endswith("lm_head.weight")}  # stored once with the embedding
    if set(tensors) != expected - tied:
        missing, unexpected = sorted(expected - tied - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(
            f"{path} does not hold this side's weights: missing {len(missing)} (e.g. {missing[:3]}), "
            f"unexpected {len(unexpected)} (e.g. {unexpected[:3]}); was it written by a run with the same model, split and peft?"
        )
    with torch.no_grad():
        model.load_state_dict(tensors, strict=False)


def generation_tokenizer(cfg: RunConfig, run_dir: Path) -> Any:
    """The tokenizer the run trained with: the one it saved, else the config's."""
    saved = tokenizer_dir(run_dir)
    if cfg.model.path is None and cfg.data.tokenizer_path is None and saved.is_dir():
        return load_tokenizer(saved)
    return build_tokenizer(cfg, save=False)


def serve_generation(cfg: RunConfig, env: DistEnv, *, client_index: int, weights: Path | None) -> None:
    """Rank 0: serve the (trained) middle stack to one client until it leaves."""
    sessions = server_sessions(cfg)
    device = resolve_device(cfg.server.device, key="server.device", local_rank=env.local_rank)
    if sessions is not None:
        sessions.pin_memory = device.type == "cuda"
    middle = MiddleStack(cfg.model, plan_for(cfg.model, cfg.split), cfg.peft, device=device)
    if weights is not None:
        load_trained(middle.hf, middle_weights_path(weights))
    server = MiddleServer(cfg, middle=middle, clients=[client_index], mode="sequential")
    endpoint = ServerEndpoint(server, sessions)
    try:
        with _serving(cfg, env, endpoint) as edge:
            server.wait_until_done(timeout=cfg.server.startup_timeout_s)
            summary = {"server": server.summary()["server"], "link": endpoint.summary(), **({"edge": edge.summary()} if edge is not None else {})}
            log.info("generation served: %s", summary["server"])
            write_json(summary, generation_summary_path(cfg.run_dir))
    finally:
        server.close()


def _serving(cfg: RunConfig, env: DistEnv, endpoint: ServerEndpoint) -> AbstractContextManager[Any]:
    """Where the generation server listens: its edge (``link.transport=socket``) or torch RPC."""
    if cfg.link.transport == "socket":
        from flglm.jobs.edge_link import serving_edge

        return serving_edge(cfg, endpoint, Role("server"), address_path=generation_edge_path(cfg.run_dir))
    rpc_entries.install(endpoint)
    return rpc_worker("server", env, rpc_options(num_worker_threads=8, timeout_s=cfg.server.rpc_timeout_s), what="the generation server")


@contextmanager
def _generation_link(cfg: RunConfig, env: DistEnv | None, role: Role, session: Any, edge_address: tuple[str, int] | None) -> Iterator[Any]:
    """The generating client's link: to the server's edge (``link.transport=socket``), or torch RPC."""
    assert role.client_index is not None
    if cfg.link.transport == "socket":
        from flglm.jobs.edge_link import edge_transport, published_address

        address = edge_address or published_address(generation_edge_path(cfg.run_dir), timeout_s=cfg.server.startup_timeout_s)
        transport = edge_transport(cfg, address)
        try:
            yield client_link(cfg, transport, role.client_index, session)
        finally:
            transport.close()
        return
    assert env is not None
    options = rpc_options(num_worker_threads=4, timeout_s=cfg.server.rpc_timeout_s)
    with rpc_worker(role.worker_name, env, options, what="the generating client"):
        rref = rpc.remote("server", rpc_entries.instance, timeout=cfg.server.startup_timeout_s)
        yield client_link(cfg, rref, role.client_index, session)


def generate_as_client(
    cfg: RunConfig,
    env: DistEnv | None,
    role: Role,
    *,
    prompts: Sequence[str],
    weights: Path | None,
    out: Path,
    raw: bool = False,
    edge_address: tuple[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Rank 1 (or a client on its own, at the server's ``edge_address``): generate a continuation
    of each prompt through the split; write them to ``out`` (JSON lines).

    A generation task's prompts go into its prompt template (see :func:`flglm.tasks.prompt_rows`) unless ``raw``."""
    assert role.client_index is not None
    session, _ = client_session(cfg, role.client_index)
    run_dir = Path(cfg.run_dir) if weights is None else weights
    tokenizer = generation_tokenizer(cfg, run_dir)
    device = resolve_device(cfg.client.device, key="client.device", local_rank=env.local_rank if env is not None else 0)
    if session is not None:
        session.pin_memory = device.type == "cuda"
    blocks = ClientBlocks(cfg.model, plan_for(cfg.model, cfg.split), cfg.peft, device=device)
    defenses = client_defenses(cfg.privacy, blocks, client_index=role.client_index)  # before the trained weights replace secret ones
    if weights is not None:
        load_trained(blocks.hf, client_weights_path(weights, role.client_index))
    with _generation_link(cfg, env, role, session, edge_address) as link:
        if session is not None:
            link.handshake()
        info = link.hello(fingerprint(cfg), tokenizer_fingerprint(tokenizer))
        module = SplitClientModule(
            SplitCausalLM(blocks, RemoteMiddle(link, server_info=info), guard=defenses.guard), optim=cfg.optim, generation=cfg.generation
        )
        # The rows keep the prompts as given; the model sees them as the task trained on them.
        rows_in = prompt_rows(cfg, tokenizer, prompts, raw=raw)
        results = module.generate_rows(rows_in, tokenizer, on_batch=lambda done, total: log.info("generated %d of %d prompts", done, total))
        rows = [{"prompt": p, "generated": text, "token_ids": ids} for p, (text, ids) in zip(prompts, results)]
        write_json(rows, out)
        link.leave({"prompts": float(len(prompts))})
    return rows
