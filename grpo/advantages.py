"""Critic-free advantages: each sample's reward against a baseline, then optionally scaled.

Estimators (`advantage.estimator`, the `ESTIMATORS` registry) differ in the baseline: "group"
(GRPO) the mean of the prompt's group, "rloo" (Ahmadian et al. 2024, arXiv 2402.14740) the mean
of the *other* samples of the group (leave-one-out, unbiased), "reinforce_pp" (REINFORCE++, Hu
2025, arXiv 2501.03262) the mean of the whole batch, no group. The scale (`advantage.scale_rewards`)
decides how much an "easy" group (all rewards close) is amplified; Dr. GRPO argues the std
division biases the update towards such groups, hence "none". RLOO as published is
estimator=rloo with scale none, REINFORCE++ estimator=reinforce_pp with scale batch
(conf/advantage/ holds those presets).

A reward the env could not give is NaN (never a silent 0): as in TRL it is left out of its
group's mean and std, and its sample gets advantage 0, so it neither pulls nor pushes.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

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


def _group_mean(rewards: Tensor) -> Tensor:
    return rewards.nanmean(dim=1, keepdim=True)


def _leave_one_out_mean(rewards: Tensor) -> Tensor:
    """Each sample's baseline [G, N]: the mean of the other given rewards of its group (NaN where
    it has no other: its advantage becomes 0)."""
    given = ~rewards.isnan()
    total = rewards.nansum(dim=1, keepdim=True)
    others = given.sum(dim=1, keepdim=True) - given.to(rewards.dtype)
    return (total - rewards.nan_to_num(nan=0.0)) / others.where(others > 0, torch.full_like(others, math.nan))


def _batch_mean(rewards: Tensor) -> Tensor:
    return rewards.nanmean()


class Estimator(NamedTuple):
    baseline: Callable[[Tensor], Tensor]  # rewards [G, N] -> baseline broadcastable to [G, N]
    scales: frozenset  # the scales that mean something with this baseline


ESTIMATORS: dict[str, Estimator] = {
    "group": Estimator(_group_mean, frozenset(SCALES)),
    "rloo": Estimator(_leave_one_out_mean, frozenset(SCALES)),
    # No group baseline: a per-group std would reintroduce the group statistics it avoids.
    "reinforce_pp": Estimator(_batch_mean, frozenset({"batch", "none"})),
}


def check_estimator(estimator: str, scale: str) -> None:
    """A bad estimator, scale or pair fails at start naming its key."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"advantage.estimator={estimator!r}: must be one of {sorted(ESTIMATORS)}")
    if scale not in ESTIMATORS[estimator].scales:
        raise ValueError(f"advantage.scale_rewards={scale!r}: estimator {estimator} allows "
                         f"{sorted(ESTIMATORS[estimator].scales)} (e.g. advantage=reinforce_pp)")


def estimate_advantages(rewards: Tensor, estimator: str, scale: str, eps: float = 1e-4) -> Tensor:
    """Advantages [G, N] from rewards [G, N] (G groups of N samples of one prompt each): the
    reward minus the estimator's baseline, divided by the scale: "group" the group's std + eps,
    "batch" the std over all G*N rewards + eps, "none" nothing. NaN rewards count in no mean or
    std and get A = 0."""
    check_estimator(estimator, scale)
    centered = rewards - ESTIMATORS[estimator].baseline(rewards)
    return (centered / SCALES[scale](rewards, eps)).nan_to_num(nan=0.0)


def group_advantages(rewards: Tensor, scale: str, eps: float = 1e-4) -> Tensor:
    """GRPO's advantages: the group-mean baseline with `scale` (`estimate_advantages(..., "group", ...)`)."""
    if scale not in SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; valid: {sorted(SCALES)}")
    return estimate_advantages(rewards, "group", scale, eps)
