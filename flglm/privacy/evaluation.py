"""Run every attack on real traffic of one client and score it against the client's text.

The traffic is made by the library's own code paths in one process: the victim's
:class:`~flglm.client.lm.SplitCausalLM` (with its configured defenses) sends a language-model
training step on held-out text through a real :class:`~flglm.client.remote.ServerLink`,
encrypted or not, to a :class:`~flglm.privacy.observe.CuriousEndpoint` over the real
:class:`~flglm.server.middle_server.MiddleServer`. The curious server attacks what its endpoint
logged, with the client-block weights it knows; a peer attacks what a :class:`Wiretap` on the
victim's transport captured, with its own client blocks.

Controls, fixed before anything runs:

* positive control: the raw embeddings of the text inverted by nearest neighbour against the
  embedding table. It must recover >= 95% of tokens, or the attack code is broken.
* negative control: the strongest forward attack (candidate search) on hidden states of the
  same text with its tokens shuffled, scored against the unshuffled text. It must stay near
  ``chance`` (sum of squared token frequencies), or the scoring leaks the answer.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector

from flglm.aggregation.masking import FIXED_POINT_BITS, PairwiseMasker, decode
from flglm.aggregation.shared import shared_parameters
from flglm.client.lm import SplitCausalLM
from flglm.client.remote import RemoteMiddle
from flglm.client.server_link import ServerLink
from flglm.config import RunConfig, fingerprint
from flglm.crypto.errors import ChannelError
from flglm.crypto.keyring import generate_key_set, load_client_keys, load_server_keys
from flglm.crypto.sessions import ClientSession, ServerSessions
from flglm.link.transport import LocalTransport
from flglm.models import ClientBlocks
from flglm.models.split import MiddleStack, plan_for
from flglm.privacy import attacks as A
from flglm.privacy.defenses import PrivacyGuard, private_parameter_names
from flglm.privacy.observe import CuriousEndpoint, ForwardView, Wiretap
from flglm.server.middle_server import MiddleServer

POSITIVE_CONTROL_MIN = 0.95
"""The positive control must recover at least this share of tokens."""
NEGATIVE_CONTROL_MARGIN = 0.05
"""The negative control must stay within this of chance."""
_MAX_MESSAGE = 1 << 30


@dataclass
class Text:
    """Right-padded token ids and their mask."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def shuffled(self, seed: int = 0) -> Text:
        """The same tokens at random places among the real positions: the negative control's input."""
        valid = self.attention_mask.bool()
        tokens = self.input_ids[valid]
        order = torch.randperm(tokens.numel(), generator=torch.Generator().manual_seed(seed))
        ids = self.input_ids.clone()
        ids[valid] = tokens[order]
        return Text(ids, self.attention_mask.clone())


def lm_loss(logits: torch.Tensor, text: Text) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens (what language-model fine-tuning minimises)."""
    targets = text.input_ids[:, 1:].clone()
    targets[text.attention_mask[:, 1:] == 0] = -100
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def client_blocks(cfg: RunConfig, weights: dict[str, torch.Tensor] | None = None) -> ClientBlocks:
    """Client blocks of ``cfg``'s model: public weights, then ``weights`` (HF names) on top."""
    blocks = ClientBlocks(cfg.model, plan_for(cfg.model, cfg.split), cfg.peft)
    if weights:
        missing = set(weights) - set(blocks.hf.state_dict())
        if missing:
            raise ValueError(f"weights for parameters the client blocks do not have: {sorted(missing)[:5]}")
        blocks.hf.load_state_dict(weights, strict=False)
    return blocks


def with_clients(cfg: RunConfig, n: int) -> RunConfig:
    """``cfg`` for a federation of ``n`` clients."""
    return dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, num_clients=n))


def attacker_view(cfg: RunConfig, victim: ClientBlocks) -> ClientBlocks:
    """The client blocks as the server knows them: the FedAvg average of the shared parameters
    (every client holds it after a round) and the public weights of the private ones."""
    private = private_parameter_names(victim, cfg.privacy.private_blocks)
    shared = {name: tensor for name, tensor in victim.hf.state_dict().items() if name not in private}
    return client_blocks(cfg, shared)


@dataclass
class Observation:
    """One training step of the victim: what the server saw, and what went on the wire."""

    view: ForwardView
    wiretap: Wiretap
    encrypted: bool
    peer_session: ClientSession | None = None


def observe_training_step(
    cfg: RunConfig, victim: ClientBlocks, middle: MiddleStack, text: Text, *, encrypted: bool = False, client_index: int = 0
) -> Observation:
    """One language-model training step of ``victim`` on ``text`` through a real link, observed."""
    with tempfile.TemporaryDirectory() as keys_dir:
        sessions = client_session = peer_session = None
        if encrypted:
            generate_key_set(keys_dir, 2)
            server_keys = load_server_keys(keys_dir, 2)
            sessions = ServerSessions(server_keys.identity, server_keys.client_keys, max_message_bytes=_MAX_MESSAGE)
            mine = load_client_keys(keys_dir, client_index, 2)
            client_session = ClientSession(client_index, mine.identity, mine.server_key, max_message_bytes=_MAX_MESSAGE)
            peer = 1 - client_index
            theirs = load_client_keys(keys_dir, peer, 2)
            peer_session = ClientSession(peer, theirs.identity, theirs.server_key, max_message_bytes=_MAX_MESSAGE)
        cfg = with_clients(cfg, 2)  # the victim and a peer
        server = MiddleServer(cfg, middle=middle)
        endpoint = CuriousEndpoint(server, sessions)
        wiretap = Wiretap(LocalTransport(endpoint))
        link = ServerLink(wiretap, client_id=client_index, timeout_s=120, session=client_session, wire_dtype=cfg.link.wire_dtype)
        info = link.hello(fingerprint(cfg), "tokenizer")
        if peer_session is not None:  # the peer is a member with its own session
            ServerLink(
                LocalTransport(endpoint), client_id=1 - client_index, timeout_s=120, session=peer_session, wire_dtype=cfg.link.wire_dtype
            ).hello(fingerprint(cfg), "tokenizer")
        guard = PrivacyGuard.from_config(cfg.privacy, client_index=client_index, hidden_size=victim.hidden_size)
        lm = SplitCausalLM(victim, RemoteMiddle(link, server_info=info), guard=guard)
        lm_loss(lm(text.input_ids, text.attention_mask), text).backward()
        victim.hf.zero_grad(set_to_none=True)
        server.close()
        (view,) = endpoint.training_views(client_index)
        return Observation(view, wiretap, encrypted, peer_session)


def _scored(predicted: torch.Tensor, text: Text) -> dict[str, float]:
    return A.score(predicted, text.input_ids, text.attention_mask).as_dict()


def _labels_scored(predicted: torch.Tensor, text: Text) -> dict[str, float]:
    mask = text.attention_mask[:, 1:] * text.attention_mask[:, :-1]
    return A.score(predicted[:, :-1], text.input_ids[:, 1:], mask).as_dict()


def server_attacks(observation: Observation, attacker: ClientBlocks, text: Text, inversion: A.LearnedInversion) -> dict[str, dict[str, float]]:
    """Every attack of the curious server on one observed step, scored against ``text``."""
    view = observation.view
    out = {
        "nearest_embedding": _scored(A.nearest_embedding_inversion(view.hidden, _embedding(attacker)), text),
        "learned_inversion": _scored(inversion.predict(view.hidden), text),
        "candidate_search": _scored(A.candidate_search(attacker, view.hidden, view.attention_mask, view.position_ids), text),
    }
    if view.gradient is not None:
        labels = A.label_recovery(attacker, view.output, view.gradient, view.attention_mask, view.position_ids)
        out["label_recovery"] = _labels_scored(labels, text)
    return out


def peer_attack(observation: Observation, peer_blocks: ClientBlocks, text: Text) -> dict[str, Any]:
    """A peer that captured the victim's forward message on the wire attacks it with its own blocks.

    In the clear the message holds the hidden states, so the peer runs the candidate search.
    Sealed, the peer can only try to open it with its own session (which fails: the message is
    authenticated under the victim's keys) and is left with ciphertext; as a sanity figure the
    ciphertext bytes are also read as floats and inverted by nearest neighbour."""
    (captured,) = observation.wiretap.messages("forward")[:1]
    if not observation.encrypted:
        hidden, mask, pos = captured[4][:3]
        predicted = A.candidate_search(peer_blocks, hidden, mask, pos)
        return {"opened": True, **_scored(predicted, text)}
    sealed: torch.Tensor = captured[2]
    assert observation.peer_session is not None
    try:
        _, opened = observation.peer_session.open(sealed, expect_kind="forward")
    except (ChannelError, ValueError):
        opened = None
    shape = (*text.input_ids.shape, peer_blocks.hidden_size)
    floats = torch.nan_to_num(sealed[: (sealed.numel() // 4) * 4].view(torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
    as_hidden = torch.zeros(shape[0] * shape[1] * shape[2])
    n = min(as_hidden.numel(), floats.numel())
    as_hidden[:n] = floats[:n]
    as_floats = _scored(A.nearest_embedding_inversion(as_hidden.view(shape), _embedding(peer_blocks)), text)["token_accuracy"]
    if opened is None:
        recovered = {"token_accuracy": 0.0, "exact_match": 0.0, "tokens": float(text.attention_mask.sum())}
    else:  # never expected: the attack would then have the hidden states
        recovered = _scored(A.candidate_search(peer_blocks, *opened[:3]), text)
    return {"opened": opened is not None, **recovered, "ciphertext_as_floats": as_floats}


def _embedding(blocks: ClientBlocks) -> torch.Tensor:
    return blocks.adapter.get(blocks.hf, blocks.adapter.token_embedding).weight


def positive_control(victim: ClientBlocks, text: Text) -> float:
    """Token accuracy of nearest-neighbour inversion of the raw embeddings of ``text``."""
    embedding = _embedding(victim).detach()
    return A.score(A.nearest_embedding_inversion(embedding[text.input_ids], embedding), text.input_ids, text.attention_mask).token_accuracy


def negative_control(attacker: ClientBlocks, victim: ClientBlocks, text: Text, *, seed: int = 0) -> dict[str, float]:
    """The candidate search on hidden states of shuffled text, scored against the real text."""
    shuffled = text.shuffled(seed)
    hidden = A.input_hidden(victim, shuffled.input_ids, shuffled.attention_mask)
    pos = torch.arange(text.input_ids.shape[1]).expand_as(text.input_ids).contiguous()
    predicted = A.candidate_search(attacker, hidden, text.attention_mask, pos)
    return {
        "token_accuracy": A.score(predicted, text.input_ids, text.attention_mask).token_accuracy,
        "chance": A.chance_level(text.input_ids, text.attention_mask),
        "majority": A.majority_level(text.input_ids, text.attention_mask),
    }


def evaluate_configuration(
    cfg: RunConfig,
    *,
    victim: ClientBlocks,
    middle: MiddleStack,
    text: Text,
    public: Text,
    inversion_steps: int = 800,
) -> dict[str, Any]:
    """Every attack on one configuration: the curious server (forward and backward channels,
    with the weights it knows), a peer without and with encryption, and both controls."""
    attacker = attacker_view(cfg, victim)
    # The attacker knows the config, so it trains its inversion network on hidden states blurred
    # the same way (its own noise draws: the client's are secret).
    blur = dataclasses.replace(cfg.privacy, noise_seed=cfg.seed + 1000)
    guard = PrivacyGuard.from_config(blur, client_index=0, hidden_size=attacker.hidden_size)
    inversion = A.train_inversion(
        attacker, public.input_ids, public.attention_mask, steps=inversion_steps, seed=cfg.seed, blur=guard.hidden if guard else None
    )
    clear = observe_training_step(cfg, victim, middle, text, encrypted=False)
    sealed = observe_training_step(cfg, victim, middle, text, encrypted=True)
    peer_blocks = attacker  # a peer holds the same shared blocks as the server knows them, plus its own private ones
    return {
        "server": server_attacks(clear, attacker, text, inversion),
        "server_encrypted_link": server_attacks(sealed, attacker, text, inversion)["candidate_search"],
        "peer_clear": peer_attack(clear, peer_blocks, text),
        "peer_encrypted": peer_attack(sealed, peer_blocks, text),
        "positive_control": positive_control(victim, text),
        "negative_control": negative_control(attacker, victim, text, seed=cfg.seed),
    }


# -------------------------------------------------------------------------- aggregation channel
def aggregation_leakage(cfg: RunConfig, texts: Sequence[Text], *, secure: bool, steps: int = 2, lr: float = 0.1) -> dict[str, Any]:
    """Two or more clients train ``steps`` steps on their own ``texts`` through one server, then
    meet for a FedAvg round (plain, or with secure aggregation). The curious server guesses
    client 0's token set from what it received: its upload (plain), or only the masked uploads
    and the average (secure). Scored by precision and recall against client 0's real tokens."""
    n = len(texts)
    truth = set(texts[0].input_ids[texts[0].attention_mask.bool()].tolist())
    probe = client_blocks(cfg)
    if f"{probe.adapter.token_embedding}.weight" in private_parameter_names(probe, cfg.privacy.private_blocks):
        # a private input block keeps the embedding on the client: the uploads carry no token rows
        return {"embedding_uploaded": False, "precision": 0.0, "recall": 0.0, "true_tokens": len(truth)}
    with tempfile.TemporaryDirectory() as keys_dir:
        generate_key_set(keys_dir, n)
        cfg_n = with_clients(cfg, n)
        # the server runs secure aggregation exactly when the configuration says so
        cfg_n = dataclasses.replace(cfg_n, crypto=dataclasses.replace(cfg_n.crypto, enabled=True, secure_aggregation=secure))
        server = MiddleServer(cfg_n)
        endpoint = CuriousEndpoint(server)
        models, links = [], []
        for i in range(n):
            link = ServerLink(LocalTransport(endpoint), client_id=i, timeout_s=120, wire_dtype=cfg_n.link.wire_dtype)
            info = link.hello(fingerprint(cfg_n), "tokenizer")
            blocks = client_blocks(cfg_n)
            guard = PrivacyGuard.from_config(cfg.privacy, client_index=i, hidden_size=blocks.hidden_size)
            models.append(SplitCausalLM(blocks, RemoteMiddle(link, server_info=info), guard=guard))
            links.append(link)
        excluded = [private_parameter_names(m.blocks, cfg.privacy.private_blocks) for m in models]
        before = _shared_vector(models[0], excluded[0])
        offset, rows, cols = _embedding_slice_of(models[0], excluded[0])
        averages: list[torch.Tensor | None] = [None] * n
        errors: list[BaseException] = []

        def client(i: int) -> None:
            try:
                lm = models[i]
                optimizer = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=lr)
                for step in range(steps):
                    lm_loss(lm(texts[i].input_ids, texts[i].attention_mask), texts[i]).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    links[i].step(client_step=step, total_steps=steps)
                vector = _shared_vector(lm, excluded[i])
                masker = None
                if secure:
                    keys = load_client_keys(keys_dir, i, n)
                    masker = PairwiseMasker(i, keys.identity, keys.peer_keys)
                averages[i] = _average(links[i], masker, vector)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        server.close()
        if errors:
            raise errors[0]
    (upload,) = [s for s in endpoint.of(0, "agg_upload")][:1]
    uploaded = upload.tensors[0]
    if uploaded.dtype == torch.int64:  # masked fixed point [w * x, w] (w = 1): what the server holds of client 0 alone
        uploaded = decode(uploaded)[:-1]
        guess_from = "masked upload"
    else:
        guess_from = "upload"

    def table(vector: torch.Tensor) -> torch.Tensor:
        return vector[offset : offset + rows * cols].view(rows, cols)

    # Secure aggregation's fixed-point encoding rounds every value by up to 2**-25 per client:
    # the attacker ignores changes within a few rounding steps.
    rounding = 4.0 * 2.0**-FIXED_POINT_BITS if secure else 0.0
    from_upload = A.revealed_tokens(table(before), table(uploaded.float()), tolerance=rounding)
    average = averages[0]
    assert average is not None
    from_average = A.revealed_tokens(table(before), table(average), tolerance=rounding)
    return {
        "embedding_uploaded": True,
        "true_tokens": len(truth),
        "from": guess_from,
        "upload": A.set_scores(from_upload, truth),
        "average": A.set_scores(from_average, truth),
        **A.set_scores(from_upload if not secure else from_average, truth),
    }


def _shared_vector(lm: SplitCausalLM, private: Collection[str]) -> torch.Tensor:
    """The vector this client's FedAvg upload carries (the callback's own order and exclusions)."""
    return parameters_to_vector([p for _, p in shared_parameters(lm, private)]).detach().float()


def _embedding_slice_of(lm: SplitCausalLM, private: Collection[str]) -> tuple[int, int, int]:
    """(offset, rows, cols) of the token embedding in that vector."""
    embedding = f"{lm.blocks.adapter.token_embedding}.weight"
    offset = 0
    for name, param in shared_parameters(lm, private):
        if name.endswith("." + embedding):
            return offset, param.shape[0], param.shape[1]
        offset += param.numel()
    raise ValueError("the FedAvg vector holds no token embedding")


def _average(link: ServerLink, masker: PairwiseMasker | None, vector: torch.Tensor) -> torch.Tensor:
    from flglm.callbacks import FedAvgCallback

    return FedAvgCallback(link, masker=masker).average(vector, 1.0)


# ------------------------------------------------------------------------------- a saved run
def encode_texts(tokenizer: Any, sentences: Sequence[str], max_length: int) -> Text:
    """Sentences as the language-model task feeds them (BOS-prefixed, truncated, right-padded)."""
    from flglm.data.readers import Example
    from flglm.tasks.language_modeling import TextCollator

    if not sentences:
        raise ValueError("no sentences to attack")
    batch = TextCollator(tokenizer, max_length)([Example(text=s) for s in sentences])
    return Text(batch["input_ids"], batch["attention_mask"])


def attack_saved_run(
    run_dir: str | Path,
    victim_sentences: Sequence[str],
    public_sentences: Sequence[str],
    *,
    max_length: int = 32,
    inversion_steps: int = 1000,
    client_index: int = 0,
) -> dict[str, Any]:
    """Every attack on a finished federation's client ``client_index`` (its saved blocks and the
    saved middle stack), the victim text being ``victim_sentences``; the attacker trains its
    inversion network on ``public_sentences``. Adds the aggregation channel (two clients, each
    on half the victim sentences, from the public weights)."""
    from flglm.config import load_config
    from flglm.data import load_tokenizer
    from flglm.jobs.generate import load_trained
    from flglm.run_layout import client_weights_path, middle_weights_path, tokenizer_dir

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    tokenizer = load_tokenizer(tokenizer_dir(run_dir))
    victims = encode_texts(tokenizer, victim_sentences, max_length)
    public = encode_texts(tokenizer, public_sentences, max_length)
    victim = client_blocks(cfg)
    load_trained(victim.hf, client_weights_path(run_dir, client_index))
    middle = MiddleStack(cfg.model, plan_for(cfg.model, cfg.split), cfg.peft)
    load_trained(middle.hf, middle_weights_path(run_dir))
    out = evaluate_configuration(cfg, victim=victim, middle=middle, text=victims, public=public, inversion_steps=inversion_steps)
    half = victims.input_ids.shape[0] // 2
    if half >= 1:
        halves = [
            Text(victims.input_ids[:half], victims.attention_mask[:half]),
            Text(victims.input_ids[half:], victims.attention_mask[half:]),
        ]
        out["aggregation_plain"] = aggregation_leakage(cfg, halves, secure=False)
        out["aggregation_secure"] = aggregation_leakage(cfg, halves, secure=True)
    return out
