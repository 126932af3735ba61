"""GRPO loss pieces against hand-computed values. float64 throughout so tolerances can be tight."""

import math

import pytest
import torch

from grpo.loss import AGGREGATIONS, LOSS_TYPES, GRPOLoss, get_aggregation, grpo_loss, importance_weights, kl_k3

F64 = torch.float64
TOL = dict(rtol=0.0, atol=1e-12)


def t(rows):
    return torch.tensor(rows, dtype=F64)


# --- aggregations ----------------------------------------------------------------------------

PER_TOKEN = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
RAGGED = t([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # masked sum = 3 + 15 = 18 over 5 tokens


def test_registries_hold_trls_aggregations_and_loss_types():
    assert sorted(AGGREGATIONS) == ["bnpo", "dapo", "dr_grpo", "grpo", "luspo"]
    assert sorted(LOSS_TYPES) == ["bnpo", "cispo", "dapo", "dr_grpo", "grpo", "luspo", "sapo", "vespo"]


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("grpo", {}, (1.5 + 5.0) / 2),  # row means (1+2)/2 and (4+5+6)/3
        ("bnpo", {}, 18 / 5),
        ("dr_grpo", {"max_completion_length": 4}, 18 / (2 * 4)),
        ("dr_grpo", {}, 18 / (2 * 3)),  # falls back to T
        ("dapo", {"num_items_in_batch": 9}, 18 / 9),
        ("dapo", {"num_items_in_batch": torch.tensor(9.0)}, 18 / 9),
        ("dapo", {}, 18 / 5),  # falls back to this micro-batch's tokens
        ("luspo", {}, (3.0 + 15.0) / 2),  # row sums, averaged over rows
    ],
)
def test_aggregations_on_a_ragged_mask(name, kwargs, expected):
    got = get_aggregation(name)(PER_TOKEN, RAGGED, **kwargs)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), **TOL)


def test_padding_never_reaches_any_aggregation():
    poisoned = PER_TOKEN.clone()
    poisoned[0, 2] = 1e6
    for name in AGGREGATIONS:
        torch.testing.assert_close(get_aggregation(name)(poisoned, RAGGED), get_aggregation(name)(PER_TOKEN, RAGGED), **TOL)


@pytest.mark.parametrize("loss_type, expected", [("grpo", (-1.0 + 2.0) / 2), ("bnpo", (-2.0 + 6.0) / 5)])
def test_grpo_loss_on_policy_is_minus_advantage_aggregated(loss_type, expected):
    # ratio 1, weights 1: per-token loss is -A of its row, [-1, -1, .] and [2, 2, 2].
    logp = t([[-0.3, -1.2, -0.7], [-2.0, -0.1, -0.5]]).requires_grad_()
    out = grpo_loss(logp, logp.detach(), logp.detach(), None, t([1.0, -2.0]), RAGGED, loss_type=loss_type)
    torch.testing.assert_close(out.loss, torch.tensor(expected, dtype=F64), **TOL)
    assert out.metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-12)
    assert out.metrics["clip_frac"] == 0.0


# --- clipping --------------------------------------------------------------------------------


def test_asymmetric_clipping_loss_gradient_and_clip_frac():
    # eps_low 0.2, eps_high 0.3: the ratio is clamped to [0.8, 1.3]. Row 0 has A=+1, row 1 A=-1.
    ratios = t([[0.5, 0.75, 1.25, 1.5], [0.5, 0.75, 1.25, 1.5]])
    old = t([[-1.0, -2.0, -0.5, -1.5], [-0.2, -3.0, -1.0, -0.7]])
    logp = (old + ratios.log()).requires_grad_()
    mask = torch.ones(2, 4, dtype=F64)
    out = grpo_loss(
        logp, old, old, None, t([1.0, -1.0]), mask, loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.3
    )
    # A>0: -min(r, clamp(r)) = -[0.5, 0.75, 1.25, 1.3]; A<0: max(r, clamp(r)) = [0.8, 0.8, 1.25, 1.5].
    expected_loss = (-(0.5 + 0.75 + 1.25 + 1.3) + (0.8 + 0.8 + 1.25 + 1.5)) / 8
    torch.testing.assert_close(out.loss, torch.tensor(expected_loss, dtype=F64), **TOL)
    out.loss.backward()
    # d/dlogp of r is r; clipped tokens (1.5 with A>0; 0.5 and 0.75 with A<0) get no gradient.
    expected_grad = t([[-0.5, -0.75, -1.25, 0.0], [0.0, 0.0, 1.25, 1.5]]) / 8
    torch.testing.assert_close(logp.grad, expected_grad, **TOL)
    # 1.25 is inside [0.8, 1.3] and 0.75 outside: swapping eps_low and eps_high would change this.
    assert out.metrics["clip_frac"] == pytest.approx(3 / 8, abs=1e-12)
    assert out.metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-12)


def test_clip_frac_counts_only_masked_tokens():
    old = torch.zeros(1, 3, dtype=F64)
    logp = t([[math.log(1.5), 0.0, math.log(1.5)]])
    out = grpo_loss(logp, old, old, None, t([1.0]), t([[1.0, 1.0, 0.0]]))
    assert out.metrics["clip_frac"] == pytest.approx(1 / 2, abs=1e-12)


# --- KL --------------------------------------------------------------------------------------

KL_LOGP = t([[0.0, -1.0], [-0.5, -2.0]])
KL_REF = t([[-1.0, 0.0], [-0.5, 0.0]])
KL_MASK = t([[1.0, 1.0], [1.0, 0.0]])
# ref - logp = [[-1, 1], [0, 2]]: exp(d) - d - 1 = [[e^-1, e - 2], [0, e^2 - 3]]
KL_EXPECTED = t([[math.exp(-1.0), math.e - 2.0], [0.0, math.exp(2.0) - 3.0]])
KL_MASKED_MEAN = (math.exp(-1.0) + math.e - 2.0 + 0.0) / 3


def test_k3_values_and_zero_when_equal():
    torch.testing.assert_close(kl_k3(KL_LOGP, KL_REF), KL_EXPECTED, **TOL)
    torch.testing.assert_close(kl_k3(KL_LOGP, KL_LOGP), torch.zeros(2, 2, dtype=F64), **TOL)


def test_beta_times_kl_is_added_to_the_policy_term():
    logp = KL_LOGP.clone().requires_grad_()
    out = grpo_loss(logp, KL_LOGP, KL_LOGP, KL_REF, t([0.5, 0.5]), KL_MASK, loss_type="bnpo", beta=0.1)
    # on policy the policy term is -A = -0.5 on every token
    torch.testing.assert_close(out.loss, torch.tensor(-0.5 + 0.1 * KL_MASKED_MEAN, dtype=F64), **TOL)
    assert out.metrics["kl"] == pytest.approx(KL_MASKED_MEAN, abs=1e-12)


def test_beta_zero_logs_kl_without_adding_it():
    out = grpo_loss(KL_LOGP, KL_LOGP, KL_LOGP, KL_REF, t([0.5, 0.5]), KL_MASK, loss_type="bnpo")
    torch.testing.assert_close(out.loss, torch.tensor(-0.5, dtype=F64), **TOL)
    assert out.metrics["kl"] == pytest.approx(KL_MASKED_MEAN, abs=1e-12)
    assert grpo_loss(KL_LOGP, KL_LOGP, KL_LOGP, None, t([0.5, 0.5]), KL_MASK).metrics["kl"] == 0.0


def test_beta_without_reference_raises():
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(KL_LOGP, KL_LOGP, KL_LOGP, None, t([0.5, 0.5]), KL_MASK, beta=0.1)


# --- importance weights ----------------------------------------------------------------------

# old - sampling = log of [[0.5, 3, 1.5], [1.5, 1.2, pad]]; the pad holds -inf on purpose.
IS_OLD = t([[-1.0, -0.5, -2.0], [-0.3, -1.1, 0.0]])
IS_RATIOS = t([[0.5, 3.0, 1.5], [1.5, 1.2, 1.0]])
IS_SAMPLING = IS_OLD - IS_RATIOS.log()
IS_SAMPLING[1, 2] = -math.inf
IS_MASK = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


@pytest.mark.parametrize(
    "level, mode, cap, expected",
    [
        ("token", "truncate", 2.0, [[0.5, 2.0, 1.5], [1.5, 1.2, 1.0]]),
        ("token", "mask", 2.0, [[0.5, 0.0, 1.5], [1.5, 1.2, 1.0]]),
        ("token", "truncate", 4.0, [[0.5, 3.0, 1.5], [1.5, 1.2, 1.0]]),
        # sequence products: 0.5 * 3 * 1.5 = 2.25 and 1.5 * 1.2 = 1.8 (padding excluded)
        ("sequence", "truncate", 2.0, [[2.0, 2.0, 2.0], [1.8, 1.8, 1.8]]),
        ("sequence", "mask", 2.0, [[0.0, 0.0, 0.0], [1.8, 1.8, 1.8]]),
        ("sequence", "mask", 2.5, [[2.25, 2.25, 2.25], [1.8, 1.8, 1.8]]),
        ("none", "truncate", 2.0, [[1.0] * 3, [1.0] * 3]),
        ("none", "mask", 1.0, [[1.0] * 3, [1.0] * 3]),
    ],
)
def test_importance_weights(level, mode, cap, expected):
    old = IS_OLD.clone().requires_grad_()
    got = importance_weights(old, IS_SAMPLING, IS_MASK, level, mode, cap)
    assert not got.requires_grad
    torch.testing.assert_close(got, t(expected), rtol=0.0, atol=1e-12)


def test_importance_weights_scale_the_loss_and_are_logged():
    # on policy w.r.t. old_logp with A=1: per-token loss is -w, token/truncate w as above
    out = grpo_loss(IS_OLD, IS_OLD, IS_SAMPLING, None, t([1.0, 1.0]), IS_MASK, loss_type="bnpo")
    masked_weight_sum = 0.5 + 2.0 + 1.5 + 1.5 + 1.2
    torch.testing.assert_close(out.loss, torch.tensor(-masked_weight_sum / 5, dtype=F64), **TOL)
    assert out.metrics["is_weight_mean"] == pytest.approx(masked_weight_sum / 5, abs=1e-12)
    gap = (math.log(2.0) + math.log(3.0) + math.log(1.5) + math.log(1.5) + math.log(1.2)) / 5
    assert out.metrics["logprob_gap"] == pytest.approx(gap, abs=1e-12)


# --- gradient accumulation -------------------------------------------------------------------


def test_dapo_micro_batches_sum_to_the_full_batch_gradient():
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 5, generator=gen, dtype=F64) * 2
    logp = (old + 0.3 * torch.randn(4, 5, generator=gen, dtype=F64)).requires_grad_()
    sampling = old + 0.1 * torch.randn(4, 5, generator=gen, dtype=F64)
    adv = t([1.0, -0.5, 2.0, -1.5])
    mask = t([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])  # 11 tokens

    grpo_loss(logp, old, sampling, None, adv, mask, loss_type="dapo").loss.backward()
    full = logp.grad.clone()
    logp.grad = None

    for rows in (slice(0, 2), slice(2, 4)):  # 7 tokens then 4: unequal on purpose
        part = grpo_loss(
            logp[rows], old[rows], sampling[rows], None, adv[rows], mask[rows], loss_type="dapo",
            num_items_in_batch=11,
        )
        part.loss.backward()
    torch.testing.assert_close(logp.grad, full, rtol=0.0, atol=1e-12)
    assert full.abs().sum() > 0

    # the per-micro-batch token mean (bnpo, averaged over micro-batches) is not the same thing
    logp.grad = None
    for rows in (slice(0, 2), slice(2, 4)):
        (grpo_loss(logp[rows], old[rows], sampling[rows], None, adv[rows], mask[rows], loss_type="bnpo").loss / 2).backward()
    assert not torch.allclose(logp.grad, full)


# --- bad names -------------------------------------------------------------------------------


def test_unknown_loss_type_names_it_and_lists_the_registry():
    with pytest.raises(ValueError, match="'bogus'") as err:
        grpo_loss(KL_LOGP, KL_LOGP, KL_LOGP, None, t([0.5, 0.5]), KL_MASK, loss_type="bogus")
    for name in ("grpo", "bnpo", "dr_grpo", "dapo"):
        assert name in str(err.value)


@pytest.mark.parametrize("level, mode, bad", [("tok", "truncate", "'tok'"), ("token", "clip", "'clip'")])
def test_unknown_importance_level_or_mode_names_it(level, mode, bad):
    with pytest.raises(ValueError, match=bad):
        importance_weights(IS_OLD, IS_SAMPLING, IS_MASK, level, mode, 2.0)


def test_cap_below_one_is_refused():
    with pytest.raises(ValueError, match="0.5"):
        importance_weights(IS_OLD, IS_SAMPLING, IS_MASK, "token", "truncate", 0.5)


# --- the configured loss ---------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, key", [
    ({"loss_type": "ppo2"}, "loss.loss_type"), ({"is_level": "batch"}, "loss.is_level"),
    ({"is_mode": "clip"}, "loss.is_mode"), ({"is_cap": 0.5}, "loss.is_cap"), ({"beta": -0.04}, "loss.beta"),
    ({"epsilon_low": -0.1}, "loss.epsilon_low"), ({"epsilon_high": -0.1}, "loss.epsilon_high"),
])
def test_grpo_loss_component_rejects_bad_options_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        GRPOLoss(**kwargs)


@pytest.mark.parametrize("aggregation, expected", [("grpo", 0.25), ("bnpo", 0.25), ("dr_grpo", 0.25), ("dapo", 1.0),
                                                    ("luspo", 0.25)])
def test_each_aggregation_carries_its_micro_batch_weight(aggregation, expected):
    # dapo already divides by the whole step's token count; the others are means over their rows.
    loss = GRPOLoss(aggregation=aggregation, importance_sampling_level="sequence")
    assert loss.micro_weight(2, 8) == expected


@pytest.mark.parametrize("loss_type", sorted(set(LOSS_TYPES) - {"luspo"}))
def test_weighted_micro_batches_give_the_full_batch_gradient(loss_type):
    # Four rows of unequal lengths in two micro-batches of two rows: weighted by its type's
    # micro_weight, the accumulated gradient is the one-batch gradient (bnpo only because both
    # micro-batches hold 4 tokens: its token mean is per micro-batch, as in TRL).
    torch.manual_seed(0)
    logp0 = -torch.rand(4, 3, dtype=F64)
    old, sampling, adv = logp0 - 0.05, logp0 - 0.1, t([1.0, -0.5, 0.25, 2.0])
    mask = t([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    loss = GRPOLoss(loss_type=loss_type, max_completion_length=3, epsilon_high=5.0 if loss_type == "cispo" else 0.2)
    full = logp0.clone().requires_grad_()
    loss(full, old, sampling, None, adv, mask, num_items_in_batch=mask.sum()).loss.backward()
    parts = logp0.clone().requires_grad_()
    for rows in (slice(0, 2), slice(2, 4)):
        out = loss(parts[rows], old[rows], sampling[rows], None, adv[rows], mask[rows], num_items_in_batch=mask.sum())
        (out.loss * loss.micro_weight(2, 4)).backward()
    torch.testing.assert_close(parts.grad, full.grad, **TOL)
    assert full.grad.abs().sum() > 0.1  # not the trivial zero gradient


def test_grpo_loss_component_computes_grpo_loss_with_its_options():
    loss = GRPOLoss(loss_type="bnpo", beta=0.1, epsilon_high=0.3)
    assert loss.needs_reference and not GRPOLoss().needs_reference
    got = loss(KL_LOGP, KL_LOGP, KL_LOGP, KL_REF, t([0.5, 0.5]), KL_MASK)
    want = grpo_loss(KL_LOGP, KL_LOGP, KL_LOGP, KL_REF, t([0.5, 0.5]), KL_MASK, loss_type="bnpo", beta=0.1,
                     epsilon_high=0.3)
    torch.testing.assert_close(got.loss, want.loss, **TOL)
    assert got.metrics == want.metrics
