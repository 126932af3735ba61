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

from grpo import seeds
from grpo.batch import Rollout, tied_groups

def check(dynamic_sampling: bool, max_sampling_rounds: int, prompts_per_step: int, group_size: int,
          max_turns: int = 1) -> None:
    """At start: every round's samples (every turn of their episodes) must get seeds of their own step."""
    rounds = max_sampling_rounds if dynamic_sampling else 1
    seeds.check_step_samples(rounds * prompts_per_step * group_size * max_turns,
                             f"train.max_sampling_rounds={max_sampling_rounds}, rollout.max_turns={max_turns}")


def sample_groups(draw: Callable[[int], Rollout], want: int, group_size: int, max_rounds: int,
                  trainer_procs: int = 1) -> Rollout:
    """The step's scored rollout from `draw(round)` (round r's prompts_per_step prompts, generated
    and scored): round 0 as it is (`max_rounds=0`), or (`train.dynamic_sampling`) the untied groups of
    as many rounds, at most `max_rounds`, as it takes to fill the step (in draw order, the surplus dropped), cut to a number of
    groups whose rows split evenly over `trainer_procs`. If no round gave one, the last round's
    groups are trained on as they are."""
    if not max_rounds:
        return draw(0)
    kept, dropped = [], 0
    for round_ in range(max_rounds):
        rollout = draw(round_)
        tied = tied_groups(rollout.rewards)
        dropped += int(tied.sum())
        kept += [rollout.select([i]) for i in range(len(rollout.prompts)) if not tied[i]]
        if len(kept) >= want:
            break
    unit = trainer_procs // math.gcd(trainer_procs, group_size)  # groups per even split
    kept = kept[:min(want, len(kept)) // unit * unit]
    result = Rollout.concat(kept) if kept else rollout
    result.sampling = {"dynamic/rounds": round_ + 1, "dynamic/groups_dropped": dropped,
                       "dynamic/prompts_sampled": (round_ + 1) * want, "dynamic/groups_kept": len(kept),
                       "dynamic/filled": float(len(kept) == want)}
    return result
