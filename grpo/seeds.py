"""Seed arithmetic, in one place: every sampling seed of a run derives from `train.seed` and
where the draw happens (step, sampling round, prompt, sample; or held-out eval), so a resumed run
draws exactly what the uninterrupted one did and no two draws share a seed.

    sample j of prompt i in round r of step s:  (seed << 40) + (s << 20) + r*P*n + i*n + j
    eval sample j of prompt i:                  (seed << 40) + (1 << 39) + i*n + j

    turn t of a multi-turn episode whose first turn has seed s0:  s0 + t * S
        (S: the step's samples over all its rounds, or eval's; turn 0 is the sample's own seed)

A step's samples (all its rounds, times rollout.max_turns) stay below 2**20, steps below 2**19, so
eval's band is clear of every training step's. vLLM gives sample j of a request seed + j, so a
request carries one prompt.
"""

from __future__ import annotations

STEP_BITS = 20
RUN_BITS = 40
SAMPLES_PER_STEP = 1 << STEP_BITS
EVAL_OFFSET = 1 << 39


def rollout_seed(seed: int, step: int, round_: int = 0, samples_per_round: int = 0) -> int:
    """Base seed of a step's sampling round (its samples: base + 0..samples_per_round-1)."""
    return (seed << RUN_BITS) + (step << STEP_BITS) + round_ * samples_per_round


def eval_seed(seed: int) -> int:
    """Base seed of held-out eval's samples, the same at every eval."""
    return (seed << RUN_BITS) + EVAL_OFFSET


def prompt_seeds(base: int, num_prompts: int, n: int) -> list[int]:
    """The seed of each prompt's request: prompt i's n samples get base + i*n + 0..n-1."""
    return [base + i * n for i in range(num_prompts)]


def turn_seed(sample_seed: int, turn: int, stride: int) -> int:
    """Seed of turn `turn` of the episode whose first turn drew with `sample_seed`; `stride`: the
    samples of its step (or eval), so each turn has a band of its own and a resumed run's episodes
    repeat exactly."""
    return sample_seed + turn * stride


def check_step_samples(samples: int, key: str) -> None:
    """At start: a step's samples (every sampling round's) must get seeds of their own step."""
    if samples > SAMPLES_PER_STEP:
        raise ValueError(f"{key}: {samples} samples per step exceed the {SAMPLES_PER_STEP} seeds a step has")
