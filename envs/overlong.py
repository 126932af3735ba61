"""DAPO's overlong reward shaping (arXiv 2503.14476, eq. 13) as a reward component, `overlong`,
added to any env's components with its weight (the `overlong:` config), so it is logged like
every other component (`reward/overlong`).

With L_max = `max_length` (default: rollout.max_tokens) and L_cache = `cache`, a completion of
`len` tokens scores 0 up to L_max - L_cache, (L_max - L_cache - len) / L_cache inside the cache
zone, and -1 beyond L_max: a soft penalty for rambling towards the length limit instead of the
hard cut a truncated completion otherwise gets. Weight 0 (the default) adds no component.
"""

from __future__ import annotations

from typing import Optional

from grpo.data import RewardWeights, Scores
from grpo.data import Completion

NAME = "overlong"


def overlong_penalty(length: int, max_length: int, cache: int) -> float:
    """DAPO's R_length(y) for a completion of `length` tokens."""
    if length <= max_length - cache:
        return 0.0
    if length <= max_length:
        return (max_length - cache - length) / cache
    return -1.0


class OverlongPenalty:
    def __init__(self, weight: float = 0.0, max_length: Optional[int] = None, cache: int = 4,
                 default_length: Optional[int] = None):
        self.weight, self.max_length, self.cache = weight, max_length or default_length, cache
        if not weight >= 0:
            raise ValueError(f"overlong.weight={weight!r}: must be >= 0 (it is a penalty already)")
        if weight and self.max_length is None:
            raise ValueError("overlong.max_length=None: give it, or the rollout.max_tokens it defaults to")
        if weight and not 1 <= cache <= self.max_length:
            raise ValueError(f"overlong.cache={cache!r}: must be in [1, max_length={self.max_length}]")

    def add(self, scores: Scores, groups: list[list[Completion]]) -> Scores:
        """The env's scores [P][G] with `overlong` added to each completion's components (as they
        were when the weight is 0)."""
        if not self.weight:
            return scores
        return [[{**s, NAME: overlong_penalty(sum(c.sampled_mask), self.max_length, self.cache)}
                 for s, c in zip(row, group)] for row, group in zip(scores, groups)]

    def weights(self, env_weights: RewardWeights) -> RewardWeights:
        """The env's weights, plus `overlong` with its weight when it counts."""
        if not self.weight:
            return env_weights
        if NAME in env_weights.weights:
            raise ValueError(f"overlong: the env already has a reward component named {NAME!r}")
        return RewardWeights({**env_weights.weights, NAME: self.weight})
