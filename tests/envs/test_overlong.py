"""DAPO's overlong reward shaping (arXiv 2503.14476, eq. 13) as the `overlong` component."""

from __future__ import annotations

import pytest
import torch

from grpo.data import Prompt
from envs.overlong import OverlongPenalty, overlong_penalty
from envs.synthetic import DigitsEnv
from grpo.batch import Rollout
from grpo.data import Completion


@pytest.mark.parametrize("length, expected", [
    (0, 0.0), (12, 0.0),  # up to L_max - L_cache = 12: no penalty
    (13, -0.25), (14, -0.5), (15, -0.75), (16, -1.0),  # (12 - len) / 4 inside the cache zone
    (17, -1.0), (40, -1.0),  # beyond L_max
])
def test_dapo_formula(length, expected):
    assert overlong_penalty(length, max_length=16, cache=4) == expected


def completion(n: int, text: str) -> Completion:
    return Completion(token_ids=list(range(n)), logprobs=[0.0] * n, text=text, finish_reason="stop")


def test_it_is_a_weighted_logged_component_of_any_envs_reward():
    env = DigitsEnv(num_prompts=8)
    groups = [[completion(10, "123"), completion(14, "12a4")], [completion(16, "1"), completion(3, "ab")]]
    rollout = Rollout([Prompt([], "1")] * 2, [[1], [1]], groups)
    shaping = OverlongPenalty(weight=0.5, cache=4, default_length=16)
    rollout.set_scores(shaping.add(env.score(rollout.prompts, rollout.texts), groups), shaping.weights(env.reward_weights))
    torch.testing.assert_close(rollout.components["overlong"], torch.tensor([[0.0, -0.5], [-1.0, 0.0]]))
    torch.testing.assert_close(rollout.rewards, torch.tensor([[1.0, 0.75 - 0.25], [1.0 - 0.5, 0.0]]))
    metrics = rollout.reward_metrics()
    assert metrics["reward/overlong"] == pytest.approx(-1.5 / 4) and metrics["reward/digits"] == pytest.approx(2.75 / 4)


def test_weight_zero_adds_nothing():
    env = DigitsEnv(num_prompts=8)
    shaping = OverlongPenalty(default_length=16)
    scores = [[{"digits": 1.0}]]
    assert shaping.add(scores, [[completion(16, "1")]]) is scores
    assert shaping.weights(env.reward_weights) is env.reward_weights


@pytest.mark.parametrize("kwargs, key", [({"weight": -1.0}, "overlong.weight"),
                                         ({"weight": 1.0, "cache": 0}, "overlong.cache"),
                                         ({"weight": 1.0, "cache": 17}, "overlong.cache")])
def test_bad_keys_are_named(kwargs, key):
    with pytest.raises(ValueError, match=key):
        OverlongPenalty(default_length=16, **kwargs)
