"""Seed arithmetic, in one place: every random draw of a run derives from `train.seed` and where
it happens (step, sampling round, eval), so a resumed run draws exactly what the uninterrupted one
did, and no two draws share a seed.

A rollout seed is `(seed << 40) + (step << 20) + i`: step s's samples get i in 0..P*n*rounds-1
(< 2**20); held-out eval draws from the band at bit 39, never a training step's.
"""

from __future__ import annotations

STEP_BITS = 20  # samples of one step (all its sampling rounds) < 2**20
RUN_BITS = 40  # steps of one run < 2**19: (step << 20) stays below the eval band at 2**39
EVAL_OFFSET = 1 << 39


def rollout_seed(seed: int, step: int, round_: int = 0, per_round: int = 0) -> int:
    """Base sampling seed of a step's sampling round (its samples get base + 0..per_round-1)."""
    return (seed << RUN_BITS) + (step << STEP_BITS) + round_ * per_round


def eval_seed(seed: int) -> int:
    """Base seed of held-out eval's samples: clear of every training step's band."""
    return (seed << RUN_BITS) + EVAL_OFFSET


def fits_step(samples: int) -> bool:
    """Whether a step's samples (every sampling round's) fit below the next step's seeds."""
    return samples < 1 << STEP_BITS
