"""Run a client process of a federation, or a centralized reference run (the server's job is
``flglm.jobs.serve``).

The launcher reads the config and the distributed environment, decides the role, and calls
``run_client`` here or ``serve.run_server``. ``run_centralized`` trains the whole model on the union of
the clients' data with the same task module, optimizer and seed: the reference every
federated result is compared with.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
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
from flglm.crypto.keyring import load_client_keys
from flglm.crypto.sessions import ClientSession
from flglm.data import Example, tokenizer_fingerprint, warn_if_many_unknown
from flglm.data.loading import (
    all_train_examples,
    build_tokenizer,
    check_fits_model,
    client_train_examples,
    dev_examples,
    save_run_tokenizer,
    train_path,
)
from flglm.data.sampler import ResumableSampler
from flglm.devices import peak_memory, resolve_device
from flglm.distributed import DistEnv, rpc_worker
from flglm.jobs.settings import max_message_bytes, rpc_backend_options
from flglm.jobs.trainer import make_trainer
from flglm.link import rpc_entries
from flglm.link.transport import FaultyTransport, RetryPolicy, RpcFunctionTransport, RpcTransport, Transport
from flglm.models.pretrained import record_loading
from flglm.models.split import ClientBlocks, build_full_model, plan_for
from flglm.privacy.defenses import client_defenses
from flglm.resume import RoundCheckpoints
from flglm.roles import Role
from flglm.run_dirs import save_run_config
from flglm.run_layout import checkpoint_dir, client_weights_path, loading_report_path
from flglm.tasks import build_task
from flglm.tensor_files import save_tensors, write_json

log = logging.getLogger("flglm")


def _loaders(
    cfg: RunConfig, train: list[Example], dev: list[Example] | None, collate: Any, seed: int
) -> tuple[DataLoader, DataLoader | None, TrainingStateCallback]:
    """The training and dev loaders, and the callback that makes the training order resumable."""
    sampler = ResumableSampler(len(train), seed=seed, shuffle=cfg.data.shuffle)
    # The loader's own generator: each iter() draws a seed from it (from the global RNG without one).
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=cfg.data.batch_size, sampler=sampler, collate_fn=collate, generator=generator)
    dev_loader = DataLoader(dev, batch_size=cfg.data.eval_batch_size, shuffle=False, collate_fn=collate) if dev else None
    return train_loader, dev_loader, TrainingStateCallback(sampler, batch_size=cfg.data.batch_size)


def warn_unknown_tokens(cfg: RunConfig, tokenizer: Any, train: list[Example], dev: list[Example] | None, *, train_file: str) -> None:
    """One warning per dataset whose tokens are more than 1% ``[UNK]`` (texts and targets)."""
    for examples, source in ((train, train_file), (dev, cfg.data.dev_path)):
        if examples:
            texts = [e.text for e in examples] + [e.target for e in examples if e.target is not None]
            warn_if_many_unknown(tokenizer, texts, source=str(source))


def _final_metrics(trainer: L.Trainer, module: SplitClientModule, dev_loader: DataLoader | None) -> dict[str, float]:
    """Metrics of the final model: a validation pass after the last aggregation."""
    metrics: dict[str, float] = {}
    if module.loss_history:
        metrics["train_loss"] = module.loss_history[-1]
    if dev_loader is not None:
        results = trainer.validate(module, dev_loader, verbose=False)  # empty with trainer.limit_val_batches=0
        for key, value in (results[0] if results else {}).items():
            metrics[key] = float(value)
    metrics["steps"] = int(trainer.global_step)
    metrics["samples"] = int(module.samples_seen)
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


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
    session = ClientSession(index, keys.identity, keys.server_key, rekey_every=cfg.crypto.rekey_every, max_message_bytes=max_message_bytes(cfg))
    masker = PairwiseMasker(index, keys.identity, keys.peer_keys, narrow=cfg.crypto.narrow_uploads) if cfg.crypto.secure_aggregation else None
    return session, masker


def client_link(cfg: RunConfig, server: rpc.RRef | str | Transport, index: int, session: ClientSession | None) -> ServerLink:
    """Client ``index``'s link to the server (an RRef to its endpoint, or, in a dynamic
    federation, the server's worker name), with the configured timeout and resends (and, for
    testing, the configured fault injection)."""
    f, faults = cfg.federation, cfg.faults
    transport: Transport = (
        RpcFunctionTransport(server, timeout_s=cfg.server.rpc_timeout_s)
        if isinstance(server, str)
        else server
        if hasattr(server, "call")
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
    return ServerLink(transport, client_id=index, timeout_s=cfg.server.rpc_timeout_s, session=session, retry=retry, wire_dtype=cfg.link.wire_dtype)


@contextmanager
def _client_link_of(
    cfg: RunConfig, env: DistEnv | None, role: Role, session: ClientSession | None, edge_address: tuple[str, int] | None
) -> Iterator[ServerLink]:
    """This client's link for the block's duration: over the server's edge, or torch RPC."""
    assert role.client_index is not None
    if cfg.link.transport == "socket":
        from flglm.jobs.edge_link import edge_transport

        if edge_address is None:
            raise ValueError("link.transport=socket: start the client with `flglm client --server HOST:PORT`")
        transport = edge_transport(cfg, edge_address)
        try:
            yield client_link(cfg, transport, role.client_index, session)
        except BaseException:
            log.exception("%s failed", role.worker_name)
            raise
        finally:
            transport.close()
        return
    assert env is not None
    with rpc_worker(role.worker_name, env, rpc_backend_options(cfg), what=role.worker_name, startup_timeout_s=cfg.server.startup_timeout_s):
        if env.dynamic:  # no RRef: a restarted process would repeat the dead one's RRef ids
            yield client_link(cfg, role.server_name, role.client_index, session)
        else:
            rref = rpc.remote(role.server_name, rpc_entries.instance, timeout=cfg.server.startup_timeout_s)
            yield client_link(cfg, rref, role.client_index, session)


def run_client(cfg: RunConfig, env: DistEnv | None, role: Role, *, edge_address: tuple[str, int] | None = None) -> dict[str, float]:
    """Train this client's task through the split; return its final metrics. ``edge_address``:
    the server's edge (``link.transport=socket``; no RPC, ``env`` unused)."""
    assert role.client_index is not None
    index = role.client_index
    out_dir = Path(cfg.run_dir) / role.worker_name
    session, masker = client_session(cfg, index)  # a missing key file fails here
    with _client_link_of(cfg, env, role, session, edge_address) as link:
        callbacks: list[L.Callback] = []
        if session is not None:
            encryption = EncryptionCallback(link, rekey_each_epoch=cfg.crypto.rekey_each_epoch)
            # An unknown client or a server whose key differs from the pin fails here,
            # before any training data is read.
            encryption.connect()
            callbacks.append(encryption)
        # Everything that can fail on bad input is checked before joining the federation.
        tokenizer = build_tokenizer(cfg, save=False)
        train = client_train_examples(cfg, index, tokenizer=tokenizer)
        dev = dev_examples(cfg, index, tokenizer=tokenizer)
        if index == 0:
            save_run_tokenizer(cfg, tokenizer)  # after the data read well: a failed start writes nothing
        warn_unknown_tokens(cfg, tokenizer, train, dev, train_file=train_path(cfg, index))
        plan = plan_for(cfg.model, cfg.split)
        device = resolve_device(cfg.client.device, key="client.device", local_rank=env.local_rank if env is not None else 0)
        if session is not None:
            session.pin_memory = device.type == "cuda"
        blocks = ClientBlocks(cfg.model, plan, cfg.peft, device=device)
        record_loading(blocks.hf, loading_report_path(cfg.run_dir, role.worker_name))
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
        trainer = make_trainer(cfg, out_dir, [*callbacks, training_state, fedavg], device)
        started = time.monotonic()
        trainer.fit(module, train_loader, dev_loader, ckpt_path=str(resume_from) if resume_from is not None else None)
        metrics = _final_metrics(trainer, module, dev_loader)
        metrics["train_time_s"] = round(time.monotonic() - started, 3)
        metrics["fedavg_rounds"] = int(fedavg.rounds)
        metrics["narrow_uploads"] = int(fedavg.narrow_uploads)
        metrics["resent_messages"] = int(link.retries)
        metrics.update(peak_memory(device))
        save_tensors(module.client_state_dict(), client_weights_path(cfg.run_dir, index))
        write_json({"metrics": metrics, "losses": module.loss_history}, out_dir / "metrics.json")
        link.leave(metrics)
    return metrics


def run_centralized(cfg: RunConfig, *, out_dir: Path | None = None) -> dict[str, float]:
    """Train the whole model on all the training data in one process (the reference)."""
    out_dir = out_dir or Path(cfg.run_dir) / "centralized"
    tokenizer = build_tokenizer(cfg, save=False)
    train = all_train_examples(cfg, tokenizer=tokenizer)
    dev = dev_examples(cfg, tokenizer=tokenizer)
    save_run_tokenizer(cfg, tokenizer)
    warn_unknown_tokens(cfg, tokenizer, train, dev, train_file=cfg.data.train_path)  # every client's file, if {client}
    lm = FullCausalLM(build_full_model(cfg.model, cfg.peft))
    check_fits_model(cfg, tokenizer, vocab_size=lm.hf.config.vocab_size, max_positions=lm.max_positions)
    module, collate = build_task(cfg, lm, tokenizer)
    train_loader, dev_loader, training_state = _loaders(cfg, train, dev, collate, seed=cfg.seed)
    trainer = make_trainer(cfg, out_dir, [training_state], resolve_device(cfg.client.device, key="client.device"))
    started = time.monotonic()
    trainer.fit(module, train_loader, dev_loader)
    metrics = _final_metrics(trainer, module, dev_loader)
    metrics["train_time_s"] = round(time.monotonic() - started, 3)
    save_tensors(module.client_state_dict(), out_dir / "model.safetensors")
    save_run_config(cfg, out_dir)  # beside its results (the run_dir may be a federation's, with its own)
    write_json({"metrics": metrics, "losses": module.loss_history}, out_dir / "metrics.json")
    return metrics
