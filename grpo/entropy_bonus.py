"""The entropy bonus, static or adaptive (TRL 1.16's `entropy_coef`, `use_adaptive_entropy`):
loss -= coef * H, H the mean policy entropy over the tokens the policy term trains on.

Adaptive (arXiv 2505.22312): after each optimizer step the coefficient moves by `delta` towards
more bonus while the step's entropy is at or below `target` and towards less above it, within
[min, max]; the bonus applies only while the last step's entropy was at or below `target` (none
before the first measurement). Its state is checkpointed, so a resumed run continues it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from grpo.objectives import require


class EntropyBonus:
    def __init__(self, entropy_coef: float = 0.0, use_adaptive_entropy: bool = False, entropy_coef_min: float = 0.0,
                 entropy_coef_max: float = 1.0, entropy_coef_delta: float = 0.005, entropy_target: float = 0.2):
        require("entropy_coef_min", entropy_coef_min, 0 <= entropy_coef_min <= entropy_coef_max,
                f"must be in [0, entropy_coef_max={entropy_coef_max}]")
        require("entropy_coef_delta", entropy_coef_delta, entropy_coef_delta >= 0, "must be >= 0")
        require("entropy_target", entropy_target, entropy_target >= 0, "must be >= 0 (entropy is)")
        self.coef, self.adaptive = entropy_coef, use_adaptive_entropy
        self.low, self.high, self.delta, self.target = entropy_coef_min, entropy_coef_max, entropy_coef_delta, entropy_target
        self.enabled = entropy_coef != 0.0 or use_adaptive_entropy
        self.last_entropy = math.inf
        self.window = [0.0, 0.0]  # entropy sum and token count over this optimizer step's micro-batches

    def __call__(self, entropy: Tensor, mask: Tensor) -> Tensor:
        """-coef * mean entropy over `mask` [B, T] (0 when disabled); `entropy` [B, T] carries the gradient."""
        if not self.enabled:
            return torch.zeros((), dtype=mask.dtype, device=mask.device)
        total = (entropy * mask).sum()
        self.window = [self.window[0] + total.item(), self.window[1] + mask.sum().item()]
        coef = self.coef if not self.adaptive or self.last_entropy <= self.target else 0.0
        return -coef * total / mask.sum().clamp(min=1.0)

    def after_update(self, reduce: Callable[[dict], dict]) -> None:
        """Close the optimizer step: the adaptive coefficient moves on the step's entropy (its sum
        and count over every trainer process, `reduce`)."""
        window, self.window = {"sum": self.window[0], "count": self.window[1]}, [0.0, 0.0]
        if not self.adaptive:
            return
        window = reduce(window)
        self.last_entropy = window["sum"] / max(window["count"], 1.0)
        if self.last_entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.high)
        else:
            self.coef = max(self.coef - self.delta, self.low)

    def state_dict(self) -> dict:
        return {"coef": self.coef, "last_entropy": self.last_entropy}

    def load_state_dict(self, state: dict) -> None:
        self.coef, self.last_entropy = state["coef"], state["last_entropy"]
