"""RewardWeights: the weighted sum of an env's reward components, and bad weights at start."""

import math

import pytest
import torch

from grpo.data import RewardWeights
from grpo.batch import Rollout


def test_total_is_the_weighted_sum_of_floats_and_tensors():
    w = RewardWeights({"correct": 1.0, "format": 0.1}, {"format": 0.5})
    assert w.weights == {"correct": 1.0, "format": 0.5} and w.names == ["correct", "format"]
    assert w.total({"correct": 1.0, "format": 1.0}) == 1.5
    assert w.total({"correct": 0.0, "format": 1.0}) == 0.5
    t = w.total({"correct": torch.tensor([[1.0, 0.0]]), "format": torch.tensor([[0.0, 1.0]])})
    assert t.tolist() == [[1.0, 0.5]]


def test_a_zero_weight_component_is_left_out_so_its_nan_does_not_count():
    w = RewardWeights({"correct": 1.0, "format": 0.1}, {"format": 0})
    assert w.total({"correct": 1.0, "format": math.nan}) == 1.0
    assert math.isnan(RewardWeights({"correct": 1.0, "format": 0.1}).total({"correct": 1.0, "format": math.nan}))


def test_a_weight_for_a_component_the_env_does_not_produce_names_its_key():
    with pytest.raises(ValueError, match=r"env.reward_weights.lenght: this env has no reward component 'lenght' "
                                         r"\(it produces \['correct', 'format'\]\)"):
        RewardWeights({"correct": 1.0, "format": 0.1}, {"lenght": 0.2})
    with pytest.raises(ValueError, match="every weight is 0"):
        RewardWeights({"digits": 1.0}, {"digits": 0})


def test_rollout_components_and_their_means():
    rollout = Rollout(prompts=[], prompt_ids=[], groups=[])
    scores = [[{"correct": 1.0, "format": 1.0}, {"correct": 0.0, "format": None}],
              [{"correct": 0.0, "format": 1.0}, {"correct": 0.0, "format": 0.0}]]
    rollout.set_scores(scores, RewardWeights({"correct": 1.0, "format": 0.5}))
    assert rollout.components["correct"].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert rollout.rewards[0, 0] == 1.5 and rollout.rewards.isnan().tolist() == [[False, True], [False, False]]
    m = rollout.reward_metrics()
    assert m["reward/correct"] == 0.25 and m["reward/format"] == pytest.approx(2 / 3)  # over the 3 given
    assert m["reward_nan"] == 1 and m["reward_mean"] == pytest.approx((1.5 + 0.5 + 0.0) / 3)
