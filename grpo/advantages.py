"""Group-relative advantages: each sample's reward against the other samples for the same prompt.

Subtracting the group mean is what makes GRPO critic-free; the optional scale decides how much
an "easy" group (all rewards close) is amplified. Dr. GRPO argues the std division biases the
update towards such groups, hence "none".

A reward the env could not give is NaN (never a silent 0): as in TRL it is left out of its
group's mean and std, and its sample gets advantage 0, so it neither pulls nor pushes.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor


def reward_tensor(scores: Sequence[Sequence[Optional[float]]]) -> Tensor:
    """Rewards [P, G] from an env's scores, None -> NaN (a missing reward, not a zero one)."""
    return torch.tensor([[math.nan if r is None else float(r) for r in group] for group in scores],
                        dtype=torch.float32)


def _nanstd(values: Tensor, dim: Optional[int] = None) -> Tensor:
    """Unbiased std over the non-NaN values as in TRL, but 0 over one or no value (where unbiased
    is undefined), so a lone sample gets advantage 0 instead of NaN."""
    keep = dim is not None
    count = (~values.isnan()).sum(dim=dim, keepdim=keep)
    squares = (values - values.nanmean(dim=dim, keepdim=keep)).square().nansum(dim=dim, keepdim=keep)
    return (squares / (count - 1).clamp(min=1)).sqrt()


# Each entry maps rewards [G, N] and eps to a divisor broadcastable against [G, N].
SCALES: dict[str, Callable[[Tensor, float], Union[Tensor, float]]] = {
    "group": lambda r, eps: _nanstd(r, dim=1) + eps,
    "batch": lambda r, eps: _nanstd(r) + eps,
    "none": lambda r, eps: 1.0,
}


def group_advantages(rewards: Tensor, scale: str, eps: float = 1e-4) -> Tensor:
    """Advantages [G, N] from rewards [G, N] (G groups of N samples of one prompt each).

    A = r - mean over the group, then divided by: "group" the group's std + eps, "batch" the std
    over all G*N rewards + eps (the mean stays per group), "none" nothing (Dr. GRPO). NaN rewards
    count in no mean or std and get A = 0.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; valid: {sorted(SCALES)}")
    centered = rewards - rewards.nanmean(dim=1, keepdim=True)
    return (centered / SCALES[scale](rewards, eps)).nan_to_num(nan=0.0)
