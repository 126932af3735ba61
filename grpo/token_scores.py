"""What the loss needs of each completion token: its logprob and the entropy of the distribution
it was drawn from, from logits, or from the last hidden states through the LM head in chunks.

Chunked (`train.logprob_chunk_tokens`): the [N, V] logits of a micro-batch's N completion tokens
(64 x 256 tokens x a 151,936-token vocabulary: 10 GB in fp32, and as much again for the
log-softmax and the backward) are never held at once. Each chunk of positions runs head ->
log-softmax -> selected logprob / entropy inside `torch.utils.checkpoint`, which keeps only the
chunk's hidden states and recomputes its logits in backward, one chunk at a time: peak memory
follows the chunk, not micro-batch x length x vocabulary, for the head's forward run once more in
backward. The gradients are the unchunked ones (tests/grpo/test_token_scores.py).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

# What each token's entropy is: not computed, a metric (no gradient), or a term the loss trains on.
ENTROPY_MODES = (None, "metric", "grad")

# Rows of [*, V] logits the entropy metric works on at once: 2**24 floats (64 MB) of temporaries
# at most, whatever the vocabulary, instead of a second [N, V] tensor.
ENTROPY_CHUNK_ELEMENTS = 2 ** 24


def gathered_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob of each target [...], logsumexp of each position [...]) from logits [..., V]."""
    lse = logits.logsumexp(-1)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse, lse


@torch.no_grad()
def token_entropy(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Entropy in nats [...] of softmax(logits) [..., V], given lse = logits.logsumexp(-1):
    H = lse - sum_v p_v * logit_v. A logging metric: no gradient, computed in row chunks, in fp32
    even inside autocast (which would run its matmul in bf16)."""
    with torch.autocast(logits.device.type, enabled=False):
        return _entropy(logits, lse)


def _entropy(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[-1]
    flat, flat_lse = logits.detach().reshape(-1, vocab), lse.detach().reshape(-1)
    out = torch.empty_like(flat_lse)
    rows = max(1, ENTROPY_CHUNK_ELEMENTS // vocab)
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start:start + rows]
        probs = (chunk - flat_lse[start:start + rows, None]).exp()
        expected = torch.bmm(probs.unsqueeze(1), chunk.unsqueeze(2)).view(-1)  # sum_v p_v * logit_v
        out[start:start + rows] = flat_lse[start:start + rows] - expected
    return out.view(lse.shape)


def token_scores(logits: torch.Tensor, targets: torch.Tensor, entropy: Optional[str] = "metric") \
        -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(logprob [N], entropy [N] or None) of targets [N] under float logits [N, V] (already
    divided by the temperature); `entropy` one of ENTROPY_MODES."""
    logp, lse = gathered_logprobs(logits, targets)
    if entropy == "grad":
        return logp, lse - ((logits - lse.unsqueeze(-1)).exp() * logits).sum(-1)
    return logp, token_entropy(logits, lse) if entropy else None


def head_scores(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
                temperature: float, chunk: Optional[int] = None, entropy: Optional[str] = "metric") \
        -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`token_scores` of targets [N] from last hidden states [N, H] through `head` (the LM head),
    `chunk` positions at a time under activation checkpointing (None: all N at once, logits kept
    for backward as an unchunked forward would)."""

    def scores(h: torch.Tensor, t: torch.Tensor):
        return token_scores(head(h).float() / temperature, t, entropy)

    if chunk is None or chunk >= hidden.shape[0]:
        return scores(hidden, targets)
    # Only where a backward will follow does a chunk's forward need recomputing: without grad the
    # chunk's logits are freed as soon as its scores are taken.
    run = (lambda h, t: checkpoint(scores, h, t, use_reentrant=False)) if torch.is_grad_enabled() else scores
    parts = [run(hidden[i:i + chunk], targets[i:i + chunk]) for i in range(0, hidden.shape[0], chunk)]
    logp = torch.cat([p[0] for p in parts])
    return logp, torch.cat([p[1] for p in parts]) if entropy else None
