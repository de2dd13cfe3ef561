"""Run one process of a federation (server or client), or a centralized reference run.

The launcher reads the config and the distributed environment, decides the role, and calls
``run_server`` or ``run_client``. ``run_centralized`` trains the whole model on the union of
the clients' data with the same task module, optimizer and seed: the reference every
federated result is compared with.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero
from lightning_fabric.utilities import rank_zero as fabric_rank_zero
from torch.distributed import rpc
from torch.utils.data import DataLoader

from flglm.aggregation.masking import PairwiseMasker
from flglm.callbacks import EncryptionCallback, FedAvgCallback, TrainingStateCallback
from flglm.callbacks.kill_at_step import KillAtStepCallback
from flglm.client.lm import FullCausalLM, SplitCausalLM
from flglm.client.module import SplitClientModule
from flglm.client.remote import RemoteMiddle
from flglm.client.server_link import ServerLink
from flglm.config import RunConfig, fingerprint
from flglm.crypto.keyring import load_client_keys, load_server_keys
from flglm.crypto.sessions import ClientSession, ServerSessions
from flglm.data import Example, tokenizer_fingerprint
from flglm.data.loading import (
    all_train_examples,
    build_tokenizer,
    check_fits_model,
    client_train_examples,
    dev_examples,
)
from flglm.data.sampler import ResumableSampler
from flglm.distributed import DistEnv, init_server_group, rpc_options, rpc_worker, store_port, wait_until_answered
from flglm.link import rpc_entries
from flglm.link.transport import FaultyTransport, RetryPolicy, RpcFunctionTransport, RpcTransport, Transport
from flglm.models.split import ClientBlocks, MiddleStack, build_full_model, plan_for
from flglm.privacy.defenses import client_defenses
from flglm.resume import RoundCheckpoints
from flglm.run_dirs import save_run_config
from flglm.roles import Role, clients_of
from flglm.run_layout import checkpoint_dir, client_weights_path, middle_weights_path, rendezvous_path, summary_path
from flglm.server.endpoint import ServerEndpoint
from flglm.server.middle_server import MiddleServer
from flglm.server.serving.parallelism import choose_parallelism, free_memory_bytes
from flglm.tasks import build_task
from flglm.tensor_files import save_tensors, write_json

log = logging.getLogger("flglm")


class StandaloneEnvironment(LightningEnvironment):
    """Each client's Trainer is a single-process job, even though torchrun started it.

    torchrun's RANK/WORLD_SIZE describe the federation, not a data-parallel job; this
    environment keeps Lightning from reading them.
    """

    @staticmethod
    def detect() -> bool:
        return False

    @property
    def creates_processes_externally(self) -> bool:
        return False

    def world_size(self) -> int:
        return 1

    def global_rank(self) -> int:
        return 0

    def local_rank(self) -> int:
        return 0

    def node_rank(self) -> int:
        return 0


def setup_logging(run_dir: Path, name: str) -> logging.Logger:
    """Log to stderr and to ``run_dir/logs/<name>.log`` (appended: an earlier attempt's lines stay);
    return a logger that writes to the file only (a failure's traceback goes there, not to stderr)."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [{name}] %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    file_handler = logging.FileHandler(run_dir / "logs" / f"{name}.log")
    for handler in (logging.StreamHandler(sys.stderr), file_handler):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    file_only = logging.getLogger(f"flglm.file.{name}")
    file_only.propagate = False
    file_only.addHandler(file_handler)
    return file_only


def _loggers(out_dir: Path) -> list[Logger]:
    """CSV always; TensorBoard too when it is installed."""
    loggers: list[Logger] = [CSVLogger(str(out_dir), name="logs", version="")]
    if _tensorboard_available():
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(out_dir), name="tensorboard", version=""))
    return loggers


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ModuleNotFoundError:
        try:
            import tensorboardX  # noqa: F401
        except ModuleNotFoundError:
            return False
    return True


def make_trainer(cfg: RunConfig, out_dir: Path, callbacks: list[L.Callback]) -> L.Trainer:
    """A single-process CPU Trainer configured from ``cfg.trainer``."""
    rank_zero.rank_zero_only.rank = 0  # type: ignore[attr-defined]
    fabric_rank_zero.rank_zero_only.rank = 0  # type: ignore[attr-defined]
    t = cfg.trainer
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=1,
        plugins=[StandaloneEnvironment()],
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        gradient_clip_algorithm=t.gradient_clip_algorithm if t.gradient_clip_val is not None else None,
        precision=t.precision,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.enable_progress_bar,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=t.num_sanity_val_steps,
        limit_val_batches=t.limit_val_batches,
        logger=_loggers(out_dir),
        callbacks=callbacks,
        default_root_dir=str(out_dir),
    )


def _loaders(
    cfg: RunConfig, train: list[Example], dev: list[Example] | None, collate: Any, seed: int
) -> tuple[DataLoader, DataLoader | None, TrainingStateCallback]:
    """The training and dev loaders, and the callback that makes the training order resumable."""
    sampler = ResumableSampler(len(train), seed=seed, shuffle=cfg.data.shuffle)
    # The loader's own generator: each iter() draws a seed from it (from the global RNG without one).
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=cfg.data.batch_size, sampler=sampler, collate_fn=collate, generator=generator)
    dev_loader = (
        DataLoader(dev, batch_size=cfg.data.eval_batch_size, shuffle=False, collate_fn=collate) if dev else None
    )
    return train_loader, dev_loader, TrainingStateCallback(sampler, batch_size=cfg.data.batch_size)


def _final_metrics(trainer: L.Trainer, module: SplitClientModule, dev_loader: DataLoader | None) -> dict[str, float]:
    """Metrics of the final model: a validation pass after the last aggregation."""
    metrics: dict[str, float] = {}
    if module.loss_history:
        metrics["train_loss"] = module.loss_history[-1]
    if dev_loader is not None:
        results = trainer.validate(module, dev_loader, verbose=False)  # empty with trainer.limit_val_batches=0
        for key, value in (results[0] if results else {}).items():
            metrics[key] = float(value)
    metrics["steps"] = float(trainer.global_step)
    metrics["samples"] = float(module.samples_seen)
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def _rpc_options(cfg: RunConfig) -> rpc.TensorPipeRpcBackendOptions:
    return rpc_options(
        num_worker_threads=max(cfg.server.num_rpc_threads, 2 * cfg.federation.num_clients + 4),
        timeout_s=cfg.server.rpc_timeout_s,
    )


def server_sessions(cfg: RunConfig) -> ServerSessions | None:
    """The server's encrypted sessions (``crypto.enabled``), from the keys in ``crypto.key_dir``."""
    if not cfg.crypto.enabled:
        return None
    keys = load_server_keys(cfg.crypto.key_dir, cfg.federation.num_clients, client_public_keys=cfg.crypto.client_public_keys)
    return ServerSessions(keys.identity, keys.client_keys, rekey_every=cfg.crypto.rekey_every, max_message_bytes=_max_message_bytes(cfg))


def client_session(cfg: RunConfig, index: int) -> tuple[ClientSession | None, PairwiseMasker | None]:
    """This client's session with the server and, with secure aggregation, its pairwise masker."""
    if not cfg.crypto.enabled:
        return None, None
    keys = load_client_keys(
        cfg.crypto.key_dir,
        index,
        cfg.federation.num_clients,
        server_public_key=cfg.crypto.server_public_key,
        client_public_keys=cfg.crypto.client_public_keys,
    )
    session = ClientSession(index, keys.identity, keys.server_key, rekey_every=cfg.crypto.rekey_every, max_message_bytes=_max_message_bytes(cfg))
    masker = PairwiseMasker(index, keys.identity, keys.peer_keys) if cfg.crypto.secure_aggregation else None
    return session, masker


def client_link(cfg: RunConfig, server: rpc.RRef | str, index: int, session: ClientSession | None) -> ServerLink:
    """Client ``index``'s link to the server (an RRef to its endpoint, or, in a dynamic
    federation, the server's worker name), with the configured timeout and resends (and, for
    testing, the configured fault injection)."""
    f, faults = cfg.federation, cfg.faults
    transport: Transport = (
        RpcFunctionTransport(server, timeout_s=cfg.server.rpc_timeout_s)
        if isinstance(server, str)
        else RpcTransport(server, timeout_s=cfg.server.rpc_timeout_s)
    )
    if faults.drop_request or faults.drop_reply or faults.duplicate:
        transport = FaultyTransport(
            transport,
            seed=faults.seed + index,
            drop_request=faults.drop_request,
            drop_reply=faults.drop_reply,
            duplicate=faults.duplicate,
        )
        log.warning("client %d: fault injection on (%s)", index, faults)
    retry = RetryPolicy(max_retries=f.max_retries, backoff_s=f.retry_backoff_s, backoff_max_s=f.retry_backoff_max_s)
    return ServerLink(transport, client_id=index, timeout_s=cfg.server.rpc_timeout_s, session=session, retry=retry)


def _max_message_bytes(cfg: RunConfig) -> int:
    return int(cfg.crypto.max_message_mb * 2**20)


def run_server(cfg: RunConfig, env: DistEnv, role: Role) -> dict[str, Any]:
    """Serve the middle stack until every client has joined and left; the coordinator (rank 0)
    writes the summary and the middle stack.

    Hierarchical: each sub-server serves its own clients with its own replica; they join the
    server ranks' process group first and are averaged at FedAvg rounds (``SubServerSync``).
    """
    run_dir = Path(cfg.run_dir)
    sessions = server_sessions(cfg)  # a missing key fails here, before the model is built
    middle = MiddleStack(cfg.model, plan_for(cfg.model, cfg.split), cfg.peft)
    parameters = sum(p.numel() for p in middle.parameters())
    choice = choose_parallelism(
        cfg,
        middle.hf.config,
        parameters=parameters,
        layers=len(middle.plan.middle),
        free_bytes=free_memory_bytes(),
    )
    log.info("%s: parallelism %s (%s)", role.worker_name, choice.mode, choice.reason)
    if choice.mode == "hierarchical":
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
        parameters,
        clients,
    )
    try:
        with rpc_worker(role.worker_name, env, _rpc_options(cfg), what=role.worker_name, startup_timeout_s=cfg.server.startup_timeout_s):
            if env.dynamic:
                publish_rendezvous(run_dir, env)
            server.wait_until_done(timeout=cfg.server.startup_timeout_s)
            own = server.summary()
            own["link"] = endpoint.summary()
            parts = server.sync.gather_json(own) if server.sync is not None else [own]
            summary = merge_server_summaries(parts)
            summary["parallelism"] = {"mode": choice.mode, "reason": choice.reason, "sub_servers": role.sub_servers}
            summary["federation"] = federation_metrics(summary["clients"])
            summary["config_fingerprint"] = fingerprint(cfg)
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


def publish_rendezvous(run_dir: Path, env: DistEnv) -> Path:
    """Write where the server's rendezvous store listens (``run_dir/rendezvous.json``), so
    clients of a dynamic federation started with ``MASTER_PORT=0`` on the server find it."""
    path = rendezvous_path(run_dir)
    write_json({"master_addr": env.master_addr, "master_port": store_port()}, path)
    log.info("rendezvous store at %s:%d (written to %s)", env.master_addr, store_port(), path)
    return path


def merge_server_summaries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary from each sub-server's: counts added up, clients merged, each sub-server kept.

    The middle stack's hash shows the replicas ended identical after the final synchronisation."""
    if len(parts) == 1:
        return dict(parts[0])

    def add(dicts: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for d in dicts:
            for key, value in d.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    out.setdefault(key, value)
                elif key == "elapsed_s":
                    out[key] = max(out.get(key, 0.0), value)
                else:
                    out[key] = out.get(key, 0) + value
        return out

    clients: dict[str, Any] = {}
    for part in parts:
        clients.update(part["clients"])
    return {
        "server": add([p["server"] for p in parts]),
        "link": add([p["link"] for p in parts]),
        "clients": dict(sorted(clients.items(), key=lambda item: int(item[0]))),
        "sub_servers": [{"server": p["server"], "link": p["link"], "clients": sorted(p["clients"], key=int)} for p in parts],
    }


def federation_metrics(clients: dict[str, dict[str, float]]) -> dict[str, float]:
    """Sample-weighted mean of each metric over the clients that reported it."""
    out: dict[str, float] = {}
    keys = sorted({k for metrics in clients.values() for k in metrics})
    for key in keys:
        rows = [(m[key], m.get("samples", 1.0)) for m in clients.values() if key in m]
        if key in ("steps", "samples"):
            out[key] = float(sum(v for v, _ in rows))
            continue
        total = sum(w for _, w in rows) or float(len(rows))
        out[key] = float(sum(v * (w or 1.0) for v, w in rows) / total)
    return out


def run_client(cfg: RunConfig, env: DistEnv, role: Role) -> dict[str, float]:
    """Train this client's task through the split; return its final metrics."""
    assert role.client_index is not None
    index = role.client_index
    out_dir = Path(cfg.run_dir) / role.worker_name
    session, masker = client_session(cfg, index)  # a missing key file fails here
    with rpc_worker(role.worker_name, env, _rpc_options(cfg), what=role.worker_name, startup_timeout_s=cfg.server.startup_timeout_s):
        if env.dynamic:  # no RRef: a restarted process would repeat the dead one's RRef ids
            link = client_link(cfg, role.server_name, index, session)
        else:
            rref = rpc.remote(role.server_name, rpc_entries.instance, timeout=cfg.server.startup_timeout_s)
            link = client_link(cfg, rref, index, session)
        callbacks: list[L.Callback] = []
        if session is not None:
            encryption = EncryptionCallback(link, rekey_each_epoch=cfg.crypto.rekey_each_epoch)
            # An unknown client or a server whose key differs from the pin fails here,
            # before any training data is read.
            encryption.connect()
            callbacks.append(encryption)
        # Everything that can fail on bad input is checked before joining the federation.
        train = client_train_examples(cfg, index)
        dev = dev_examples(cfg)
        tokenizer = build_tokenizer(cfg, save=index == 0)
        plan = plan_for(cfg.model, cfg.split)
        blocks = ClientBlocks(cfg.model, plan, cfg.peft)
        defenses = client_defenses(cfg.privacy, blocks, client_index=index)
        log.info("%s: privacy defenses: %s", role.worker_name, defenses.summary)
        check_fits_model(cfg, tokenizer, vocab_size=blocks.hf.config.vocab_size, max_positions=blocks.max_positions)
        log.info("%s: %d training examples, client blocks %s", role.worker_name, len(train), plan.layers_of("client"))
        checkpoints = RoundCheckpoints(
            checkpoint_dir(cfg.run_dir, role.worker_name), every=cfg.server.checkpoint_every, keep=cfg.server.checkpoint_keep
        )
        offered = checkpoints.rounds() if cfg.resume else None
        info = link.hello(fingerprint(cfg), tokenizer_fingerprint(tokenizer), checkpoints=offered)
        # A process joining a federation already past the agreed round (a restarted client) does
        # not load that old checkpoint: its rounds would lag behind the others' for good.
        late = info.get("next_round", 0) > info.get("resume_round", 0)
        resume_from = checkpoints.path(info["resume_round"]) if info.get("resume_round") and not late else None
        if resume_from is not None:
            log.info("%s: resuming from %s", role.worker_name, resume_from)
        lm = SplitCausalLM(blocks, RemoteMiddle(link, server_info=info), guard=defenses.guard)
        module, collate = build_task(cfg, lm, tokenizer)
        train_loader, dev_loader, training_state = _loaders(cfg, train, dev, collate, seed=cfg.seed + index)
        fedavg = FedAvgCallback(
            link,
            every_n_steps=cfg.federation.aggregate_every,
            masker=masker,
            checkpoints=checkpoints if checkpoints.every else None,
            exclude=defenses.private_names,
        )
        if resume_from is None and info.get("next_round", 0) > 0:
            # A restarted process trains again from the start, but takes part in the round the
            # others are at (it gets their average there), not in the long-finished round 0.
            log.info("%s: joining the federation at FedAvg round %d", role.worker_name, info["next_round"])
            fedavg.load_state_dict({"round": info["next_round"], "seen_before": 0, "last_step": -1})
        if cfg.faults.kill_client_at_step and cfg.faults.kill_client == index:
            callbacks.append(KillAtStepCallback(cfg.faults.kill_client_at_step))
        trainer = make_trainer(cfg, out_dir, [*callbacks, training_state, fedavg])
        started = time.monotonic()
        trainer.fit(module, train_loader, dev_loader, ckpt_path=str(resume_from) if resume_from is not None else None)
        metrics = _final_metrics(trainer, module, dev_loader)
        metrics["train_time_s"] = round(time.monotonic() - started, 3)
        metrics["fedavg_rounds"] = float(fedavg.rounds)
        metrics["resent_messages"] = float(link.retries)
        save_tensors(module.client_state_dict(), client_weights_path(cfg.run_dir, index))
        write_json({"metrics": metrics, "losses": module.loss_history}, out_dir / "metrics.json")
        link.leave(metrics)
    return metrics


def run_centralized(cfg: RunConfig, *, out_dir: Path | None = None) -> dict[str, float]:
    """Train the whole model on all the training data in one process (the reference)."""
    out_dir = out_dir or Path(cfg.run_dir) / "centralized"
    train = all_train_examples(cfg)
    dev = dev_examples(cfg)
    tokenizer = build_tokenizer(cfg, save=True)
    lm = FullCausalLM(build_full_model(cfg.model, cfg.peft))
    check_fits_model(cfg, tokenizer, vocab_size=lm.hf.config.vocab_size, max_positions=lm.max_positions)
    module, collate = build_task(cfg, lm, tokenizer)
    train_loader, dev_loader, training_state = _loaders(cfg, train, dev, collate, seed=cfg.seed)
    trainer = make_trainer(cfg, out_dir, [training_state])
    started = time.monotonic()
    trainer.fit(module, train_loader, dev_loader)
    metrics = _final_metrics(trainer, module, dev_loader)
    metrics["train_time_s"] = round(time.monotonic() - started, 3)
    save_tensors(module.client_state_dict(), out_dir / "model.safetensors")
    write_json({"metrics": metrics, "losses": module.loss_history}, out_dir / "metrics.json")
    return metrics
