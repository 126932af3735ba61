"""DAPO's dynamic sampling (arXiv 2503.14476, sec. 3.2; verl's `filter_groups`): a group whose
rewards all tie has advantage 0 under a group baseline and teaches nothing, so it is dropped and
more prompts are sampled until the step has `train.prompts_per_step` groups with a reward spread,
at most `train.max_sampling_rounds` rounds; then the step trains on the groups it has (and the
metrics say so: `dynamic/*`). Round r of step s is sampled with seeds from (seed, s, r) and the
env's cursor, which checkpoints carry, so a resumed run draws exactly the same groups.
"""

from __future__ import annotations

import math
from typing import Callable

from grpo.batch import Rollout, tied_groups

# vLLM seeds of a step span 2**20 samples (train.rollout_seed): every round's must fit.
SEEDS_PER_STEP = 2 ** 20


def check(train_cfg) -> None:
    """At start: every round's samples must get seeds of their own step."""
    rounds = train_cfg.max_sampling_rounds if train_cfg.dynamic_sampling else 1
    samples = rounds * train_cfg.prompts_per_step * train_cfg.group_size
    if samples > SEEDS_PER_STEP:
        raise ValueError(f"train.max_sampling_rounds={train_cfg.max_sampling_rounds}: {samples} samples per step "
                         f"exceed the {SEEDS_PER_STEP} seeds a step has")


def sample_groups(draw: Callable[[int], Rollout], train_cfg, trainer_procs: int = 1) -> Rollout:
    """The step's scored rollout from `draw(round)` (round r's prompts_per_step prompts, generated
    and scored): round 0 as it is, or, with `train.dynamic_sampling`, the untied groups of as many
    rounds as it takes to fill the step (in draw order, the surplus dropped), cut to a number of
    groups whose rows split evenly over `trainer_procs`. If no round gave one, the last round's
    groups are trained on as they are."""
    if not train_cfg.dynamic_sampling:
        return draw(0)
    want, kept, dropped = train_cfg.prompts_per_step, [], 0
    for round_ in range(train_cfg.max_sampling_rounds):
        rollout = draw(round_)
        tied = tied_groups(rollout.rewards)
        dropped += int(tied.sum())
        kept += [rollout.select([i]) for i in range(len(rollout.prompts)) if not tied[i]]
        if len(kept) >= want:
            break
    unit = trainer_procs // math.gcd(trainer_procs, train_cfg.group_size)  # groups per even split
    kept = kept[:min(want, len(kept)) // unit * unit]
    result = Rollout.concat(kept) if kept else rollout
    result.sampling = {"dynamic/rounds": round_ + 1, "dynamic/groups_dropped": dropped,
                       "dynamic/prompts_sampled": (round_ + 1) * want, "dynamic/groups_kept": len(kept),
                       "dynamic/filled": float(len(kept) == want)}
    return result
