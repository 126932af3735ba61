"""Group advantages against hand-computed values (float64, tolerances stated per call)."""

import math

import pytest
import torch

from grpo.advantages import group_advantages

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
