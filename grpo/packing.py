"""Micro-batches by token budget, their rows packed end to end without padding.

`train.max_tokens_per_micro_batch` groups consecutive rows of a step so that each micro-batch's
real tokens (prompt + completion, padding not counted) stay within the budget, and the forward
then runs on one sequence holding those rows back to back: position ids restart at 0 on each row
and, from them, transformers builds attention that never crosses rows (its "padding-free" path:
`position_ids` given and no attention mask; under sdpa, a block-diagonal causal mask). A step of
variable-length completions (multi-turn especially) then costs the tokens it holds, not rows x
the longest row. The maths per token is the padded layout's: logprobs, entropy, loss and
gradients agree to float tolerance (tests/grpo/test_packing.py); the loss normalisers still come
from the whole step (lab/loop.py).

A row longer than the budget goes alone in its micro-batch: a prompt's length is not known at
start, so refusing it mid-run would end a run over one long prompt. What start-up can check, it
does: a budget below the most tokens an episode samples fails naming the key (runtime/config.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch

from grpo.batch import Batch


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
    return Packed(flat[None], positions[None], predict, rows, cols)


def unpack(values: torch.Tensor, packed: Packed, shape: tuple[int, int]) -> torch.Tensor:
    """[N] values of the packed completion tokens -> [b, C], 0 on padding (masked by the loss)."""
    out = values.new_zeros(shape)
    out[packed.rows, packed.cols] = values
    return out
