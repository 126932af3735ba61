"""Dynamic sampling's filling rule on scored rollouts (the vLLM runs are tests/test_dynamic_sampling_run.py)."""

from __future__ import annotations

import pytest
import torch

from grpo.data import Prompt
from grpo.batch import Rollout
from grpo.dynamic_sampling import check, sample_groups
from grpo.data import Completion


def rollout_of(round_: int, rewards: list[list[float]]) -> Rollout:
    """A scored rollout whose prompt i of round r answers f"{r}.{i}"."""
    groups = [[Completion([1], [0.0], "x", "stop") for _ in row] for row in rewards]
    prompts = [Prompt([], f"{round_}.{i}") for i in range(len(rewards))]
    rollout = Rollout(prompts, [[1]] * len(rewards), groups)
    rollout.rewards = torch.tensor(rewards)
    rollout.components = {"r": rollout.rewards}
    return rollout


TIED, SPREAD = [1.0, 1.0], [0.0, 1.0]
ROUNDS = [[TIED, SPREAD, TIED, SPREAD], [SPREAD, TIED, TIED, TIED], [TIED, SPREAD, SPREAD, TIED]]


def cfg(**kw) -> dict:
    return {"dynamic_sampling": True, "max_sampling_rounds": 4, "prompts_per_step": 4, "group_size": 2, **kw}


def sizes(c: dict) -> tuple[int, int, int]:
    """sample_groups' (want, group_size, max_rounds) for train settings `c`."""
    return c["prompts_per_step"], c["group_size"], c["max_sampling_rounds"] if c["dynamic_sampling"] else 0


def test_keeps_untied_groups_in_order_until_the_step_is_full():
    drawn = []
    out = sample_groups(lambda r: drawn.append(r) or rollout_of(r, ROUNDS[r]), *sizes(cfg()))
    assert drawn == [0, 1, 2]  # round 2 fills it; no fourth round
    assert [p.answer for p in out.prompts] == ["0.1", "0.3", "1.0", "2.1"]  # 2.2 is surplus
    assert not (out.rewards[:, 0] == out.rewards[:, 1]).any()
    assert out.sampling == {"dynamic/rounds": 3, "dynamic/groups_dropped": 7, "dynamic/prompts_sampled": 12,
                            "dynamic/groups_kept": 4, "dynamic/filled": 1.0}


def test_after_max_rounds_trains_on_what_it_has_and_says_so():
    out = sample_groups(lambda r: rollout_of(r, ROUNDS[r]), *sizes(cfg(max_sampling_rounds=2)))
    assert [p.answer for p in out.prompts] == ["0.1", "0.3", "1.0"]
    assert out.sampling["dynamic/filled"] == 0.0 and out.sampling["dynamic/groups_kept"] == 3


def test_rows_split_evenly_over_trainer_processes():
    # 3 groups of 2 rows over 4 processes: 2 groups (4 rows) are kept
    out = sample_groups(lambda r: rollout_of(r, ROUNDS[r]), *sizes(cfg(max_sampling_rounds=2)), trainer_procs=4)
    assert [p.answer for p in out.prompts] == ["0.1", "0.3"]


def test_all_tied_trains_on_the_last_round_and_off_draws_once():
    out = sample_groups(lambda r: rollout_of(r, [TIED] * 4), *sizes(cfg(max_sampling_rounds=2)))
    assert [p.answer for p in out.prompts] == ["1.0", "1.1", "1.2", "1.3"] and out.sampling["dynamic/groups_kept"] == 0
    drawn = []
    out = sample_groups(lambda r: drawn.append(r) or rollout_of(r, ROUNDS[r]), *sizes(cfg(dynamic_sampling=False)))
    assert drawn == [0] and len(out.prompts) == 4 and out.sampling == {}


def test_too_many_rounds_for_a_steps_seeds_is_refused():
    with pytest.raises(ValueError, match="train.max_sampling_rounds"):
        check(**cfg(prompts_per_step=1024, group_size=64, max_sampling_rounds=17))
