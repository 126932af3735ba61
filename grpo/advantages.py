"""Group-relative advantages: each sample's reward against the other samples for the same prompt.

Subtracting the group mean is what makes GRPO critic-free; the optional scale decides how much
an "easy" group (all rewards close) is amplified. Dr. GRPO argues the std division biases the
update towards such groups, hence "none".
"""

from __future__ import annotations

from typing import Callable, Optional, Union

from torch import Tensor


def _std(values: Tensor, dim: Optional[int] = None) -> Tensor:
    """Unbiased std as in TRL, but 0 over a single sample (where unbiased is undefined), so a
    lone sample gets advantage 0 instead of NaN."""
    count = values.numel() if dim is None else values.shape[dim]
    return values.std(dim=dim, keepdim=dim is not None, correction=1 if count > 1 else 0)


# Each entry maps rewards [G, N] and eps to a divisor broadcastable against [G, N].
_SCALES: dict[str, Callable[[Tensor, float], Union[Tensor, float]]] = {
    "group": lambda r, eps: _std(r, dim=1) + eps,
    "batch": lambda r, eps: _std(r) + eps,
    "none": lambda r, eps: 1.0,
}


def group_advantages(rewards: Tensor, scale: str, eps: float = 1e-4) -> Tensor:
    """Advantages [G, N] from rewards [G, N] (G groups of N samples of one prompt each).

    A = r - mean over the group, then divided by: "group" the group's std + eps, "batch" the std
    over all G*N rewards + eps (the mean stays per group), "none" nothing (Dr. GRPO).
    """
    if scale not in _SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; valid: {sorted(_SCALES)}")
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    return centered / _SCALES[scale](rewards, eps)
