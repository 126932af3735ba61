"""Micro-batches by token budget, their rows packed end to end without padding.

`train.max_tokens_per_micro_batch` groups consecutive rows of a step so that each micro-batch's
real tokens (prompt + completion, padding not counted) stay within the budget, and the forward
then runs on one sequence holding those rows back to back, position ids restarting at 0 on each
row: embeddings, projections, MLPs and the LM head see only real tokens. Attention must not
cross rows. transformers' own "padding-free" path (position ids and no mask) builds a
block-diagonal [T, T] mask, exact but T^2: at 45 rows x 90 tokens one layer's sdpa took 3.2 s
(forward + backward, 2 cores) against 0.07 s for the same rows padded. So a packed forward runs
attention as `packed_sdpa` (registered as PACKED_ATTENTION, `use_packed_attention`): q, k, v
scattered into right-padded [rows, H, L, D], causal sdpa with no mask (the padding after a row's
tokens is never attended by them), gathered back: rows x L^2 like the padded layout, no mask
built. Models on another attention (or with sliding-window layers) take transformers' path.

A step of variable-length completions (multi-turn especially) then costs the tokens it holds,
not rows x the longest row. The maths per token is the padded layout's: logprobs, entropy, loss
and gradients agree to float tolerance (tests/grpo/test_packing.py); the loss normalisers still
come from the whole step (lab/loop.py).

A row longer than the budget goes alone in its micro-batch: a prompt's length is not known at
start, so refusing it mid-run would end a run over one long prompt. What start-up can check, it
does: a budget below the most tokens an episode samples fails naming the key (runtime/config.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from grpo.batch import Batch

# The attention a packed forward runs (`packed_sdpa`): transformers' sdpa, plus rows packed end to end.
PACKED_ATTENTION = "sdpa_packed"


def budget_slices(lengths: list[int], max_tokens: int) -> list[slice]:
    """Consecutive rows, greedily, while their summed `lengths` fit `max_tokens`; a row over the
    budget alone. Order is kept, so the micro-batches' outputs concatenate back to the step's."""
    slices, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and used + n > max_tokens:
            slices.append(slice(start, i))
            start, used = i, 0
        used += n
    if lengths:
        slices.append(slice(start, len(lengths)))
    return slices


def micro_batches(batch: Batch, rows: int, max_tokens: Optional[int] = None) -> Iterator[Batch]:
    """The step's micro-batches: `rows` rows each (padded), or with `max_tokens` packed ones
    within that token budget (`train.micro_batch_size` / `train.max_tokens_per_micro_batch`)."""
    if max_tokens is None:
        yield from batch.micro_batches(rows)
        return
    for sl in budget_slices(batch.attention_mask.sum(-1).tolist(), max_tokens):
        yield replace(batch.rows(sl), packed=True)


@dataclass
class Packed:
    """Rows [b] of a padded micro-batch laid end to end: T real tokens, N of them completion
    tokens the loss scores."""

    input_ids: torch.Tensor  # [1, T] each row's prompt ++ completion tokens, no padding
    position_ids: torch.Tensor  # [1, T] 0.. from each row's first token (as vLLM numbers them)
    slots: torch.Tensor  # [T] long: row * L + position, each token's place in a right-padded [rows, L]
    padded_shape: tuple[int, int]  # (rows, L = the longest row)
    predict: torch.Tensor  # [N] long: the positions whose logits predict a completion token
    rows: torch.Tensor  # [N] long: where each of those lands in the padded [b, C] layout
    cols: torch.Tensor  # [N] long

    @property
    def targets(self) -> torch.Tensor:
        """[N] the completion tokens the `predict` positions predict."""
        return self.input_ids[0, self.predict + 1]


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> Packed:
    """From the padded layout (prompts left-padded to `prompt_len`, completions right-padded):
    each row's attended tokens, in order, rows back to back."""
    real = attention_mask.bool()
    lengths = real.sum(-1)  # [b]
    prompt_lens = real[:, :prompt_len].sum(-1)  # [b]
    starts = lengths.cumsum(0) - lengths  # [b] where each row begins in the packed sequence
    flat = input_ids[real]  # [T], row-major: each row's prompt, then its completion
    positions = torch.arange(flat.numel(), device=flat.device) - starts.repeat_interleave(lengths)
    rows, cols = real[:, prompt_len:].nonzero(as_tuple=True)  # [N] each completion token
    predict = starts[rows] + prompt_lens[rows] - 1 + cols  # the position before it
    longest = int(lengths.max())
    slots = torch.arange(len(lengths), device=flat.device).repeat_interleave(lengths) * longest + positions
    return Packed(flat[None], positions[None], slots, (len(lengths), longest), predict, rows, cols)


def unpack(values: torch.Tensor, packed: Packed, shape: tuple[int, int]) -> torch.Tensor:
    """[N] values of the packed completion tokens -> [b, C], 0 on padding (masked by the loss)."""
    out = values.new_zeros(shape)
    out[packed.rows, packed.cols] = values
    return out


def packed_sdpa(module, query, key, value, attention_mask, packed_slots=None, packed_shape=None, **kwargs):
    """transformers' sdpa; for packed rows (query/key/value [1, H, T, D], `packed_slots` and
    `packed_shape` from `Packed`) attention within each row only: scattered into right-padded
    [rows, H, L, D], causal with no mask, gathered back to [1, T, H, D]."""
    if packed_slots is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows, longest = packed_shape

    def padded(x: torch.Tensor) -> torch.Tensor:  # [1, H, T, D] -> [rows, H, L, D]
        heads, dim = x.shape[1], x.shape[3]
        out = x.new_zeros(rows * longest, heads, dim).index_put((packed_slots,), x[0].transpose(0, 1))
        return out.view(rows, longest, heads, dim).transpose(1, 2)

    out, weights = sdpa_attention_forward(module, padded(query), padded(key), padded(value), None, **kwargs)
    return out.reshape(rows * longest, *out.shape[2:])[packed_slots].unsqueeze(0), weights  # [1, T, H, D]


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # padded forwards: sdpa's own masks


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch a transformers model on sdpa to `packed_sdpa` (the same maths for padded forwards);
    one with another attention, or sliding-window layers, keeps its own (packed forwards then take
    transformers' block-diagonal mask: exact, T^2)."""
    config = model.config
    if config._attn_implementation == "sdpa" and set(getattr(config, "layer_types", None) or ["full_attention"]) \
            == {"full_attention"}:
        model.set_attn_implementation(PACKED_ATTENTION)


def packed_inputs(model, layout: Packed) -> dict:
    """The forward's keyword arguments for a packed layout: `packed_sdpa`'s slots and no mask to
    build, or (another attention) no mask, so transformers derives one from the position ids."""
    inputs = {"input_ids": layout.input_ids, "position_ids": layout.position_ids}
    config = model.config
    if config._attn_implementation == PACKED_ATTENTION:
        inputs |= {"attention_mask": {kind: None for kind in set(getattr(config, "layer_types", None) or
                                                                  ["full_attention"])},
                   "packed_slots": layout.slots, "packed_shape": layout.padded_shape}
    return inputs
