"""Group advantages against hand-computed values (float64, tolerances stated per call)."""

import math

import pytest
import torch

from grpo.advantages import check_estimator, estimate_advantages, group_advantages, reward_tensor

TOL = dict(rtol=0.0, atol=1e-12)
# Group 0 has mean 0.5 and unbiased std sqrt(1/3); group 1 mean 0.25, unbiased std 0.5.
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
CENTERED = torch.tensor([[0.5, -0.5, -0.5, 0.5], [-0.25, -0.25, -0.25, 0.75]], dtype=torch.float64)


def test_group_scale_divides_by_each_groups_unbiased_std_plus_eps():
    expected = torch.cat(
        [CENTERED[:1] / (math.sqrt(1 / 3) + 1e-4), CENTERED[1:] / (0.5 + 1e-4)]
    )
    torch.testing.assert_close(group_advantages(REWARDS, "group"), expected, **TOL)


def test_batch_scale_keeps_group_mean_but_divides_by_the_batch_std():
    # 3 ones, 5 zeros: mean 3/8, squared deviations 3 * (5/8)^2 + 5 * (3/8)^2 = 1.875, over 7.
    expected = CENTERED / (math.sqrt(1.875 / 7) + 1e-4)
    torch.testing.assert_close(group_advantages(REWARDS, "batch"), expected, **TOL)


def test_none_scale_only_centres():
    torch.testing.assert_close(group_advantages(REWARDS, "none"), CENTERED, **TOL)


def test_eps_is_the_one_given():
    expected = CENTERED[1:] / (0.5 + 0.25)
    torch.testing.assert_close(group_advantages(REWARDS[1:], "group", eps=0.25), expected, **TOL)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_degenerate_groups_give_zero_not_nan(scale):
    same = torch.full((2, 4), 3.0, dtype=torch.float64)
    single = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(same, scale), torch.zeros(2, 4, dtype=torch.float64), **TOL)
    torch.testing.assert_close(group_advantages(single, scale), torch.zeros(2, 1, dtype=torch.float64), **TOL)


def test_unknown_scale_names_the_value_and_the_valid_ones():
    with pytest.raises(ValueError, match="'grop'") as err:
        group_advantages(REWARDS, "grop")
    for valid in ("group", "batch", "none"):
        assert valid in str(err.value)


NAN = math.nan


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_a_missing_reward_is_left_out_of_its_groups_statistics(scale):
    # Group 0 with its NaN dropped is group 0 of REWARDS minus its last sample: [1, 0, 0],
    # mean 1/3, unbiased std sqrt(1/3); group 1 is REWARDS' group 1 unchanged.
    with_nan = torch.tensor([[1.0, 0.0, 0.0, NAN], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    got = group_advantages(with_nan, scale)
    dropped = group_advantages(with_nan[:1, :3], scale)
    assert got[0, 3] == 0.0  # the missing sample neither pulls nor pushes
    if scale != "batch":  # the batch std also changes by the NaN's absence, checked below
        torch.testing.assert_close(got[0, :3], dropped[0], **TOL)
        torch.testing.assert_close(got[1], group_advantages(REWARDS, scale)[1], **TOL)
    expected_row0 = torch.tensor([2 / 3, -1 / 3, -1 / 3], dtype=torch.float64)
    if scale == "group":
        expected_row0 = expected_row0 / (math.sqrt(1 / 3) + 1e-4)
    if scale == "batch":  # 7 given rewards: 2 ones, 5 zeros; mean 2/7, squares 2*(5/7)^2 + 5*(2/7)^2 = 10/7, over 6
        expected_row0 = expected_row0 / (math.sqrt(10 / 7 / 6) + 1e-4)
    torch.testing.assert_close(got[0, :3], expected_row0, **TOL)


def test_an_all_missing_group_gets_zero_advantages_and_leaves_the_others_alone():
    rewards = torch.tensor([[NAN, NAN, NAN, NAN], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    got = group_advantages(rewards, "group")
    torch.testing.assert_close(got[0], torch.zeros(4, dtype=torch.float64), **TOL)
    torch.testing.assert_close(got[1], group_advantages(REWARDS, "group")[1], **TOL)


def test_reward_tensor_turns_none_into_nan_not_zero():
    rewards = reward_tensor([[1.0, None], [0, 0.5]])
    assert rewards.dtype == torch.float32 and rewards.shape == (2, 2)
    assert math.isnan(rewards[0, 1]) and rewards[1, 0] == 0.0 and rewards[0, 0] == 1.0


# --- estimators: RLOO and REINFORCE++ ----------------------------------------------------------

def test_rloo_subtracts_the_mean_of_the_other_samples():
    # Ahmadian et al. 2024 (arXiv 2402.14740), eq. 5: A_i = r_i - 1/(k-1) sum_{j != i} r_j.
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 6.0]], dtype=torch.float64)
    expected = torch.tensor([[1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3],
                             [3 - 9 / 3, 1 - 11 / 3, 2 - 10 / 3, 6 - 6 / 3]], dtype=torch.float64)
    torch.testing.assert_close(estimate_advantages(rewards, "rloo", "none"), expected, **TOL)
    # = G/(G-1) times the group-centred reward, and scaled by the same std as GRPO's
    torch.testing.assert_close(estimate_advantages(rewards, "rloo", "none"), 4 / 3 * group_advantages(rewards, "none"),
                               **TOL)
    torch.testing.assert_close(estimate_advantages(rewards, "rloo", "group"), 4 / 3 * group_advantages(rewards, "group"),
                               **TOL)


def test_rloo_leaves_a_missing_reward_out_of_every_baseline():
    rewards = torch.tensor([[1.0, math.nan, 0.0, 2.0], [5.0, math.nan, math.nan, math.nan]], dtype=torch.float64)
    got = estimate_advantages(rewards, "rloo", "none")
    expected = torch.tensor([[1 - 1.0, 0.0, 0 - 1.5, 2 - 0.5], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(got, expected, **TOL)  # a lone given reward has no baseline: 0


def test_reinforce_pp_normalises_over_the_batch_without_group_statistics():
    # Hu 2025 (arXiv 2501.03262), outcome reward, gamma 1: A = (r - mean_batch) / std_batch.
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    mean, std = 4 / 6, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64).std().item()
    expected = (rewards - mean) / (std + 1e-4)
    torch.testing.assert_close(estimate_advantages(rewards, "reinforce_pp", "batch"), expected, **TOL)
    # A tied group still moves (the batch baseline is not its own): GRPO would give it 0.
    assert (estimate_advantages(rewards, "reinforce_pp", "batch")[0] > 0).all()
    torch.testing.assert_close(estimate_advantages(rewards, "reinforce_pp", "none"), rewards - mean, **TOL)


@pytest.mark.parametrize("estimator, scale, key", [("rlooo", "none", "advantage.estimator"),
                                                   ("reinforce_pp", "group", "advantage.scale_rewards"),
                                                   ("rloo", "median", "advantage.scale_rewards")])
def test_bad_estimator_or_pair_names_the_key(estimator, scale, key):
    with pytest.raises(ValueError, match=key):
        check_estimator(estimator, scale)
