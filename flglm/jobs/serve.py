"""Run a server process of a federation: the middle stack, its endpoint, and how clients reach it.

Kept apart from the client's job (``flglm.jobs.train``) so a server process never imports
Lightning, the tasks or their metrics: it starts seconds sooner, and holds none of that code.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from flglm.config import RunConfig, fingerprint
from flglm.crypto.keyring import load_server_keys
from flglm.crypto.sessions import ServerSessions
from flglm.devices import memory_summary, peak_memory, resolve_device
from flglm.distributed import DistEnv, init_server_group, rpc_worker, store_port, wait_until_answered
from flglm.jobs.settings import max_message_bytes, rpc_backend_options
from flglm.jobs.summaries import federation_metrics, integer_counts, merge_server_summaries
from flglm.link import rpc_entries
from flglm.models.pretrained import record_loading
from flglm.models.split import MiddleStack, plan_for
from flglm.roles import Role, clients_of
from flglm.run_dirs import save_run_config
from flglm.run_layout import loading_report_path, middle_weights_path, rendezvous_path, summary_path
from flglm.server.endpoint import ServerEndpoint
from flglm.server.middle_server import MiddleServer
from flglm.server.serving.parallelism import choose_parallelism, free_memory_bytes
from flglm.tensor_files import save_tensors, write_json

log = logging.getLogger("flglm")


def server_sessions(cfg: RunConfig) -> ServerSessions | None:
    """The server's encrypted sessions (``crypto.enabled``), from the keys in ``crypto.key_dir``."""
    if not cfg.crypto.enabled:
        return None
    keys = load_server_keys(cfg.crypto.key_dir, cfg.federation.num_clients, client_public_keys=cfg.crypto.client_public_keys)
    return ServerSessions(keys.identity, keys.client_keys, rekey_every=cfg.crypto.rekey_every, max_message_bytes=max_message_bytes(cfg))


def run_server(cfg: RunConfig, env: DistEnv, role: Role) -> dict[str, Any]:
    """Serve the middle stack until every client has joined and left; the coordinator (rank 0)
    writes the summary and the middle stack.

    Hierarchical: each sub-server serves its own clients with its own replica; they join the
    server ranks' process group first and are averaged at FedAvg rounds (``SubServerSync``).
    """
    run_dir = Path(cfg.run_dir)
    sessions = server_sessions(cfg)  # a missing key fails here, before the model is built
    device = resolve_device(cfg.server.device, key="server.device", local_rank=env.local_rank)
    if sessions is not None:
        sessions.pin_memory = device.type == "cuda"
    middle = MiddleStack(cfg.model, plan_for(cfg.model, cfg.split), cfg.peft, device=device)
    record_loading(middle.hf, loading_report_path(run_dir, role.worker_name))
    choice = choose_parallelism(
        cfg,
        middle.hf.config,
        trainable=sum(p.numel() for p in middle.parameters() if p.requires_grad),
        layers=len(middle.plan.middle),
        free_bytes=free_memory_bytes(device),
        where=str(device),
    )
    log.info("%s: parallelism %s (%s)", role.worker_name, choice.mode, choice.reason)
    if choice.mode == "hierarchical":
        if cfg.link.transport == "socket" and env.agent_store:
            log.warning(
                "%s: torchrun's store listens on every address of %s's machine, so clients that reach it can write to it: "
                "across organisations start each sub-server with `flglm train --sub-server I --cluster HOST:PORT` instead (README)",
                role.worker_name,
                env.master_addr,
            )
        init_server_group(
            env,
            index=role.server_index,
            size=role.sub_servers,
            startup_timeout_s=cfg.server.startup_timeout_s,
            timeout_s=cfg.server.sync_timeout_s,
        )
    clients = clients_of(role.server_index, num_clients=cfg.federation.num_clients, sub_servers=role.sub_servers)
    kill_at = cfg.faults.kill_server_at_step if env.restart_count == 0 else 0
    server = MiddleServer(cfg, middle=middle, clients=clients, mode=choice.mode, kill_at_step=kill_at)
    endpoint = ServerEndpoint(server, sessions)
    rpc_entries.install(endpoint)
    log.info("%s: encryption %s", role.worker_name, "on (AES-256-GCM per client)" if sessions else "OFF (crypto.enabled=false)")
    log.info(
        "%s: middle stack = blocks %s (%d parameters), serving clients %s",
        role.worker_name,
        list(middle.plan.middle),
        sum(p.numel() for p in middle.parameters()),
        clients,
    )
    try:
        with _server_link(cfg, env, role, endpoint) as edge:
            if env.dynamic:
                publish_rendezvous(run_dir, env)
            server.wait_until_done(timeout=cfg.server.startup_timeout_s)
            own = server.summary()
            own["link"] = endpoint.summary()
            if edge is not None:
                own["edge"] = edge.summary()
            parts = server.sync.gather_json(own) if server.sync is not None else [own]
            summary = merge_server_summaries(parts)
            summary["parallelism"] = {"mode": choice.mode, "reason": choice.reason, "sub_servers": role.sub_servers}
            summary["clients"] = {c: integer_counts(m) for c, m in summary["clients"].items()}
            summary["federation"] = federation_metrics(summary["clients"])
            summary["config_fingerprint"] = fingerprint(cfg)
            summary["memory"] = memory_summary(peak_memory(device), summary["clients"])
            if role.is_coordinator:
                save_tensors(server.middle.hf_state_dict(), middle_weights_path(run_dir))
                save_run_config(cfg)  # with the results only: a failed start leaves an older run's config.yaml alone
                write_json(summary, summary_path(run_dir))  # last: it marks the run finished
                log.info("federation done: %s", summary["federation"])
            if env.dynamic and not wait_until_answered(timeout_s=cfg.server.rpc_timeout_s):
                log.warning("%s: shutting down with answers still in progress", role.worker_name)
    finally:
        server.close()
    return summary


def _server_link(cfg: RunConfig, env: DistEnv, role: Role, endpoint: ServerEndpoint) -> AbstractContextManager[Any]:
    """How clients reach this server: its edge (``link.transport=socket``; yields the Edge) or torch RPC (yields None)."""
    if cfg.link.transport == "socket":
        from flglm.jobs.edge_link import serving_edge

        return serving_edge(cfg, endpoint, role)
    return rpc_worker(role.worker_name, env, rpc_backend_options(cfg), what=role.worker_name, startup_timeout_s=cfg.server.startup_timeout_s)


def publish_rendezvous(run_dir: Path, env: DistEnv) -> Path:
    """Write where the server's rendezvous store listens (``run_dir/rendezvous.json``), so
    clients of a dynamic federation started with ``MASTER_PORT=0`` on the server find it."""
    path = rendezvous_path(run_dir)
    write_json({"master_addr": env.master_addr, "master_port": store_port()}, path)
    log.info("rendezvous store at %s:%d (written to %s)", env.master_addr, store_port(), path)
    return path
