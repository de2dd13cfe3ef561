"""Attacks of a curious server (or a curious peer) on what it sees of a client's training.

Every attack takes only what its attacker has: the tensors that crossed the link (hidden
states with their mask and positions, the gradient returned for the server's output, FedAvg
uploads) and the weights the attacker knows (the public checkpoint, or the client blocks it
learns from FedAvg). None of them looks at the client's text; the scorers compare with it.

* Forward channel (the hidden states the client sends):
  - :func:`nearest_embedding_inversion`: each hidden state's nearest row of the embedding table
    (cosine). Exact when the client sends raw embeddings; weaker after a client block.
  - :class:`LearnedInversion`: a small network the attacker trains on public text that it
    passes through its copy of the client's input block, mapping hidden states to tokens.
  - :func:`candidate_search`: position by position, every vocabulary token is run through the
    attacker's copy of the input block after the tokens found so far; the one whose hidden
    state is nearest wins. With the client's real weights this is exact (causal blocks).
* Backward channel: :func:`label_recovery` reads the next-token labels (for language-model
  training, the text itself) from the gradient the client returns, through the attacker's
  copy of the output block and LM head (one vector-Jacobian and one Jacobian-vector product).
* Aggregation channel: :func:`revealed_tokens`: the embedding rows a FedAvg upload changed are
  the tokens the client trained on.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from flglm.link.crossing import Crossing
from flglm.models.split import ClientBlocks


@dataclass(frozen=True)
class Recovery:
    """How much of the truth an attack recovered."""

    token_accuracy: float
    """Fraction of the scored tokens the attack got right."""
    exact_match: float
    """Fraction of sequences with every scored token right."""
    tokens: int

    def as_dict(self) -> dict[str, float]:
        return {"token_accuracy": self.token_accuracy, "exact_match": self.exact_match, "tokens": float(self.tokens)}


def score(predicted: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> Recovery:
    """Compare ``predicted`` token ids with ``truth`` where ``mask`` is set (all ``[batch, length]``)."""
    if predicted.shape != truth.shape or truth.shape != mask.shape:
        raise ValueError(f"shapes differ: predicted {list(predicted.shape)}, truth {list(truth.shape)}, mask {list(mask.shape)}")
    mask = mask.bool()
    right = (predicted == truth) & mask
    tokens = int(mask.sum())
    rows = mask.any(dim=1)
    whole = ((right | ~mask).all(dim=1) & rows).sum()
    return Recovery(
        token_accuracy=float(right.sum()) / max(1, tokens),
        exact_match=float(whole) / max(1, int(rows.sum())),
        tokens=tokens,
    )


def chance_level(truth: torch.Tensor, mask: torch.Tensor) -> float:
    """Accuracy of guessing tokens drawn from the data's own token frequencies: sum of p(token)^2.

    What an attack that learned nothing from the hidden states scores against shuffled text."""
    tokens = truth[mask.bool()]
    if tokens.numel() == 0:
        return 0.0
    p = torch.bincount(tokens).double() / tokens.numel()
    return float((p * p).sum())


def majority_level(truth: torch.Tensor, mask: torch.Tensor) -> float:
    """Accuracy of always guessing the data's most frequent token (an attack that learned only the
    token frequencies, e.g. a network that falls back to its prior, scores about this)."""
    tokens = truth[mask.bool()]
    return float(torch.bincount(tokens).max()) / tokens.numel() if tokens.numel() else 0.0


# ----------------------------------------------------------------------------- forward channel
def _cosine_argmax(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    keys = F.normalize(keys.float(), dim=-1)
    flat = F.normalize(queries.reshape(-1, queries.shape[-1]).float(), dim=-1)
    best = [(part @ keys.T).argmax(dim=-1) for part in flat.split(chunk)]
    return torch.cat(best).view(queries.shape[:-1])


@torch.no_grad()
def nearest_embedding_inversion(hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """Token ids whose (public) embedding row is nearest, by cosine, to each hidden state."""
    return _cosine_argmax(hidden, embedding)


def input_hidden(blocks: ClientBlocks, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, batch: int = 64) -> torch.Tensor:
    """The hidden states ``blocks`` send for these tokens (the attacker's copy of the input block)."""
    with torch.no_grad():
        parts = [blocks.input_block(ids, mask).hidden for ids, mask in zip(input_ids.split(batch), attention_mask.split(batch), strict=True)]
    return torch.cat(parts)


class LearnedInversion(nn.Module):
    """An inversion network: hidden state -> token, trained by the attacker on public text.

    The attacker passes text it has (any public corpus of the same tokenizer) through its copy
    of the client's input block and fits a two-layer network to map each position's hidden
    state back to its token. Inputs are standardised with statistics of the training states.
    """

    def __init__(self, hidden_size: int, vocab_size: int, width: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, vocab_size))
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("std", torch.ones(hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net((hidden - self.mean) / self.std)

    def fit(
        self,
        hidden: torch.Tensor,
        tokens: torch.Tensor,
        *,
        steps: int = 1500,
        batch: int = 1024,
        lr: float = 3e-3,
        seed: int = 0,
    ) -> LearnedInversion:
        """Fit on ``hidden`` states ``[n, H]`` of known ``tokens`` ``[n]``."""
        if hidden.shape[0] != tokens.shape[0] or hidden.shape[0] == 0:
            raise ValueError(f"need as many hidden states as tokens (> 0), got {hidden.shape[0]} and {tokens.shape[0]}")
        hidden = hidden.detach().float()
        self.mean.copy_(hidden.mean(dim=0))
        self.std.copy_(hidden.std(dim=0).clamp_min(1e-6))
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        for _ in range(steps):
            pick = torch.randint(0, hidden.shape[0], (min(batch, hidden.shape[0]),), generator=generator)
            loss = F.cross_entropy(self(hidden[pick]), tokens[pick])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return self

    @torch.no_grad()
    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        return self(hidden.float()).argmax(dim=-1)


def train_inversion(
    blocks: ClientBlocks,
    public_ids: torch.Tensor,
    public_mask: torch.Tensor,
    *,
    steps: int = 1500,
    seed: int = 0,
    blur: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> LearnedInversion:
    """A :class:`LearnedInversion` trained on public text through the attacker's ``blocks``.

    ``blur``: what the client's defenses do to the hidden states it sends (the attacker knows
    the config), applied to the training states so the network learns to see through it."""
    hidden = input_hidden(blocks, public_ids, public_mask)
    if blur is not None:
        with torch.no_grad():
            hidden = blur(hidden)
    valid = public_mask.bool()
    model = LearnedInversion(blocks.hidden_size, int(blocks.hf.config.vocab_size))
    return model.fit(hidden[valid], public_ids[valid], steps=steps, seed=seed)


@torch.no_grad()
def candidate_search(blocks: ClientBlocks, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Recover each row's tokens one position at a time through the attacker's input block.

    The hidden state at position t depends only on tokens 0..t (causal attention), so with the
    tokens before t found, trying every vocabulary token at t (one batched step on a key/value
    cache of the found prefix) and keeping the nearest (Euclidean) finds token t. Positions
    outside ``attention_mask`` are skipped (predicted 0).
    """
    vocab = int(blocks.hf.config.vocab_size)
    candidates = torch.arange(vocab).view(vocab, 1)
    out = torch.zeros(hidden.shape[:2], dtype=torch.long)
    for row in range(hidden.shape[0]):
        cache = DynamicCache(config=blocks.hf.config)
        for seen, t in enumerate(attention_mask[row].nonzero().flatten().tolist()):
            position = position_ids[row, t].view(1, 1)
            trial_cache = copy.deepcopy(cache)
            trial_cache.batch_repeat_interleave(vocab)
            trial = blocks.input_block(
                candidates, torch.ones(vocab, seen + 1, dtype=torch.long), position.expand(vocab, 1).contiguous(), trial_cache
            ).hidden
            best = int(((trial[:, 0].float() - hidden[row, t].float()) ** 2).sum(dim=-1).argmin())
            out[row, t] = best
            blocks.input_block(torch.tensor([[best]]), torch.ones(1, seen + 1, dtype=torch.long), position, cache)
    return out


# ---------------------------------------------------------------------------- backward channel
def label_recovery(
    blocks: ClientBlocks,
    server_output: torch.Tensor,
    gradient: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
) -> torch.Tensor:
    """The label at each position, read from the gradient the client returned for the server's output.

    For a mean cross-entropy over N labelled positions, the returned gradient is
    ``g = A((P - Y) / N)``, where A is the vector-Jacobian product of the client's output block
    and LM head at the server's output, P the softmax and Y the one-hot labels. The server
    knows its output, so with the output block's weights it computes P and ``A(P / N)``
    itself; what remains, ``r = A(P / N) - g = A(Y) / N``, is a sum of the label columns of A.
    Scoring every (position, token) pair by its column's agreement with r is one
    Jacobian-vector product ``J r``; the best token per position is the label. N is taken as
    the number of positions that have a next token (language-model training).
    """
    mask = attention_mask.long()
    h = server_output.detach().float()

    def logits_of(h: torch.Tensor) -> torch.Tensor:
        return blocks.output_block(Crossing(h, mask, position_ids))

    labelled = (mask[:, 1:] * mask[:, :-1]).sum().clamp_min(1).double()
    h_in = h.clone().requires_grad_(True)
    logits = logits_of(h_in)
    probs = torch.softmax(logits.double(), dim=-1).float()
    weights = torch.zeros_like(probs)
    weights[:, :-1] = probs[:, :-1] * (mask[:, 1:] * mask[:, :-1]).unsqueeze(-1)
    (expected,) = torch.autograd.grad(logits, h_in, grad_outputs=weights / float(labelled))
    residual = (expected - gradient.float()).detach()
    with _eager_attention(blocks.hf):  # fused attention kernels have no forward-mode derivative
        _, scores = torch.func.jvp(logits_of, (h,), (residual,))
    return scores.argmax(dim=-1)


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


# ------------------------------------------------------------------------- aggregation channel
def revealed_tokens(before: torch.Tensor, after: torch.Tensor, *, tolerance: float = 0.0) -> set[int]:
    """Rows of an embedding table (``[vocab, H]``) that an update changed: the tokens trained on.

    Without weight decay, an embedding row's gradient is non-zero only for tokens in the input,
    and an Adam or SGD update moves only rows that ever had a gradient."""
    changed = (after.float() - before.float()).abs().amax(dim=-1) > tolerance
    return set(changed.nonzero().flatten().tolist())


def set_scores(predicted: Iterable[int], truth: Iterable[int]) -> dict[str, float]:
    """Precision and recall of a guessed set of tokens against the true set."""
    predicted, truth = set(predicted), set(truth)
    hit = len(predicted & truth)
    return {"precision": hit / max(1, len(predicted)), "recall": hit / max(1, len(truth))}
