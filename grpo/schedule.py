"""Learning-rate schedules: linear warmup to the optimizer's lr, then constant, linear or cosine
decay towards `min_lr_ratio` * lr (the decays of HF's `get_*_schedule_with_warmup`).

The scheduler steps once per training step, so the lr is a function of the step alone: skipped
updates and `train.num_iterations` do not shift it, and a resumed run continues it exactly.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

# Each maps progress through the decay phase, 0 -> 1, to a factor 1 -> 0.
DECAYS: dict[str, Callable[[float], float]] = {
    "constant": lambda progress: 1.0,
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}


def lr_factor(step: int, *, total_steps: int, decay: str, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr for training step `step` (0-based): (step + 1) / warmup_steps
    during warmup (never 0), then min_lr_ratio + (1 - min_lr_ratio) * decay(progress), with
    progress = (step - warmup_steps) / (total_steps - warmup_steps)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * DECAYS[decay](progress)


def warmup_schedule(optimizer: torch.optim.Optimizer, total_steps: int, decay: str = "constant",
                    warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """The `scheduler:` component; `total_steps` (train.steps) is given when it is built."""
    if decay not in DECAYS:
        raise ValueError(f"scheduler.decay={decay!r}: must be one of {sorted(DECAYS)}")
    factor = functools.partial(lr_factor, total_steps=total_steps, decay=decay, warmup_steps=warmup_steps,
                               min_lr_ratio=min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
