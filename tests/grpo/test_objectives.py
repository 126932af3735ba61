"""Every objective against TRL 1.16, in float64: per-token loss, aggregate and gradient, over random
inputs with ragged masks, every loss type, token- and sequence-level ratios, the vLLM correction,
the options (delta, off-policy mask, entropy mask, KL with and without bias correction, entropy
bonus), multi-pass old logprobs and micro-batching.

The reference is `trl_compute_loss` below: TRL 1.16's `GRPOTrainer._compute_loss`
(trl/trainer/grpo_trainer.py) from the per-token logprobs on, transcribed for one process in
train mode with `steps_per_generation == gradient_accumulation_steps` (TRL's default), with its
helpers `get_off_policy_mask`, `get_gamma_weights` and `get_high_entropy_mask` (the same file);
`test_transcribed_helpers_are_trls` checks the first two against TRL itself.
"""

from __future__ import annotations

import math

import pytest
import torch

from grpo.loss import GRPOLoss, importance_weights
from grpo.objectives import OBJECTIVES

F64 = torch.float64
TOL = dict(rtol=0.0, atol=1e-9)


# --- the reference: TRL 1.16, trl/trainer/grpo_trainer.py ---------------------------------------

def trl_get_off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold):
    """GRPOTrainer.get_off_policy_mask."""
    kl_div = sampling_per_token_logps - per_token_logps.detach()
    kl_div = torch.nan_to_num(kl_div, nan=0.0)
    seq_kl_sum = (kl_div * mask).sum(dim=1, keepdim=True)
    avg_seq_kl = seq_kl_sum / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    is_pos_adv = advantages >= 0
    is_low_kl = avg_seq_kl <= off_policy_threshold
    return (is_pos_adv | is_low_kl).to(dtype=mask.dtype)


@torch.no_grad()
def trl_get_gamma_weights(advantages, log_ratio_per_token, mask, importance_sampling_ratio,
                          k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0):
    """GRPOTrainer.get_gamma_weights."""
    lower_clamp = math.log(1e-8)
    log_ratio_clamped = torch.clamp(log_ratio_per_token, -20.0, 20.0)
    seq_log_ratio = torch.sum(log_ratio_clamped * mask, dim=-1, keepdim=True)
    if importance_sampling_ratio is not None:
        log_is_ratio = torch.clamp(torch.log(importance_sampling_ratio), lower_clamp, 20.0)
        seq_log_ratio += torch.sum(log_is_ratio, dim=-1, keepdim=True)
    log_w_seq = torch.clamp(seq_log_ratio, lower_clamp, 20.0)
    w_seq = torch.exp(log_w_seq)
    is_nonneg_adv = advantages >= 0
    k_seq = torch.where(is_nonneg_adv, k_pos, k_neg)
    lambda_seq = torch.where(is_nonneg_adv, lambda_pos, lambda_neg).clamp(min=1e-4)
    log_phi = lambda_seq + k_seq * log_w_seq - lambda_seq * w_seq
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def trl_get_high_entropy_mask(entropies, mask, threshold):
    """GRPOTrainer.get_high_entropy_mask, one process (no gather)."""
    gathered = entropies[mask.bool()].float() if entropies.dtype != F64 else entropies[mask.bool()]
    if gathered.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    entropy_threshold = torch.quantile(gathered, threshold)
    masked_entropies = entropies * mask.float() if entropies.dtype != F64 else entropies * mask
    return (masked_entropies >= entropy_threshold) & mask.bool()


def trl_compute_loss(per_token_logps, entropies, inputs, args, accumulation_steps):
    """GRPOTrainer._compute_loss after the forward (`args` holds the GRPOConfig fields)."""
    mask = inputs["completion_mask"]
    if args["top_entropy_quantile"] < 1.0:
        entropy_mask = trl_get_high_entropy_mask(entropies, mask, 1 - args["top_entropy_quantile"])
    else:
        entropy_mask = None
    advantages = inputs["advantages"].unsqueeze(1)
    old_per_token_logps = inputs.get("old_per_token_logps")
    old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    if args["off_policy_mask_threshold"] is not None:
        sampling_per_token_logps = inputs.get("sampling_per_token_logps", old_per_token_logps)
        off_policy_mask = trl_get_off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask,
                                                  args["off_policy_mask_threshold"])
    log_ratio = per_token_logps - old_per_token_logps
    if args["importance_sampling_level"] == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if args["beta"] != 0.0:
        ref_per_token_logps = inputs["ref_per_token_logps"]
        per_token_kl = (torch.exp(ref_per_token_logps - per_token_logps)
                        - (ref_per_token_logps - per_token_logps) - 1)
        if args["use_bias_correction_kl"]:
            per_token_kl = per_token_kl * coef_1
    loss_type = args["loss_type"]
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=args["epsilon_high"]).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    elif loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
        coef_2 = torch.clamp(coef_1, 1 - args["epsilon"], 1 + args["epsilon_high"])
        if args["delta"] is not None:
            coef_1 = torch.clamp(coef_1, max=args["delta"])
        per_token_loss1 = coef_1 * advantages
        per_token_loss2 = coef_2 * advantages
        per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    elif loss_type == "sapo":
        temperatures = torch.where(advantages > 0, args["sapo_temperature_pos"], args["sapo_temperature_neg"])
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        per_token_loss = -soft_coef_1 * advantages
    elif loss_type == "vespo":
        phi_seq = trl_get_gamma_weights(advantages, log_ratio, mask, inputs.get("importance_sampling_ratio"))
        per_token_loss = -phi_seq * advantages * per_token_logps
    if args["off_policy_mask_threshold"] is not None:
        per_token_loss = per_token_loss * off_policy_mask
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if "importance_sampling_ratio" in inputs and loss_type != "vespo":
        per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]
    if args["beta"] != 0.0:
        per_token_loss = per_token_loss + args["beta"] * per_token_kl
    if loss_type in ["grpo", "sapo"]:
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation_steps
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / accumulation_steps
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * args["max_completion_length"])
        loss = loss / accumulation_steps
    elif loss_type in ["cispo", "dapo", "vespo"]:
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0)  # * accumulation_steps / steps_per_generation
        loss = (per_token_loss * mask).sum() / normalizer
    elif loss_type == "luspo":
        loss = (per_token_loss * mask).sum(-1).mean() / accumulation_steps
    if args["entropy_coef"] != 0.0:
        effective_mask = mask if entropy_mask is None else mask * entropy_mask
        entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / accumulation_steps
        loss = loss - args["entropy_coef"] * entropy_loss
    return loss


# --- the comparison --------------------------------------------------------------------------

B, T, L = 8, 7, 9  # rows, completion positions, max_completion_length


def random_step(seed: int, multi_pass: bool):
    """One step's tensors: ragged masks (one row empty), trainer/old/vLLM/reference logprobs and
    entropies far enough apart that every clip, cap and mask has tokens on both sides."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=gen, dtype=F64) * 3 - 0.05
    lengths = torch.tensor([7, 1, 4, 0, 6, 3, 7, 5])
    mask = (torch.arange(T) < lengths.unsqueeze(1)).to(F64)
    old = logp + 0.4 * torch.randn(B, T, generator=gen, dtype=F64) if multi_pass else None
    sampling = (logp if old is None else old) + 0.3 * torch.randn(B, T, generator=gen, dtype=F64)
    ref = logp + 0.2 * torch.randn(B, T, generator=gen, dtype=F64)
    entropy = torch.rand(B, T, generator=gen, dtype=F64) * 2
    adv = torch.randn(B, generator=gen, dtype=F64)
    adv[2] = 0.0
    return logp, mask, old, sampling, ref, entropy, adv


FEATURES = {  # our loss.* options -> the same thing in TRL's GRPOConfig names
    "plain": {},
    "vllm_is_token": {"is_level": "token"},
    "vllm_is_sequence": {"is_level": "sequence", "is_mode": "mask", "is_cap": 3.0},
    "delta": {"delta": 1.4},
    "off_policy_mask": {"off_policy_mask_threshold": 0.05},
    "top_entropy": {"top_entropy_quantile": 0.4},
    "kl": {"beta": 0.1},
    "kl_bias_corrected": {"beta": 0.1, "use_bias_correction_kl": True},
    "entropy_bonus": {"entropy_coef": 0.03, "top_entropy_quantile": 0.6},
}
LEVELS = {"grpo": ("token", "sequence"), "bnpo": ("token", "sequence"), "dr_grpo": ("token", "sequence"),
          "dapo": ("token", "sequence"), "cispo": ("token", "sequence"), "sapo": ("token", "sequence"),
          "luspo": ("sequence",), "vespo": ("token",)}
CASES = [(loss_type, level, feature) for loss_type, levels in LEVELS.items() for level in levels
         for feature in FEATURES
         if not (feature == "delta" and loss_type in ("cispo", "sapo", "vespo"))
         and not (feature == "vllm_is_sequence" and loss_type == "vespo")]


def our_options(loss_type: str, level: str, feature: str) -> dict:
    return {"loss_type": loss_type, "importance_sampling_level": level, "is_level": "none",
            "epsilon_low": 0.2, "epsilon_high": 1.3 if loss_type == "cispo" else 0.28,
            "max_completion_length": L, **FEATURES[feature]}


def trl_args(options: dict) -> dict:
    return {"loss_type": options["loss_type"], "importance_sampling_level": options["importance_sampling_level"],
            "epsilon": options["epsilon_low"], "epsilon_high": options["epsilon_high"],
            "delta": options.get("delta"), "off_policy_mask_threshold": options.get("off_policy_mask_threshold"),
            "top_entropy_quantile": options.get("top_entropy_quantile", 1.0), "beta": options.get("beta", 0.0),
            "use_bias_correction_kl": options.get("use_bias_correction_kl", False),
            "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05,
            "entropy_coef": options.get("entropy_coef", 0.0), "max_completion_length": L}


@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("multi_pass", [False, True])
@pytest.mark.parametrize("loss_type, level, feature", CASES)
def test_loss_aggregate_and_gradient_equal_trls(loss_type, level, feature, multi_pass, micro_batches):
    logp0, mask, old, sampling, ref, entropy0, adv = random_step(7, multi_pass)
    options = our_options(loss_type, level, feature)
    loss = GRPOLoss(**options)
    num_items = mask.sum()
    old_or_detached = old if old is not None else logp0  # TRL: per_token_logps.detach() on one pass
    weights = importance_weights(old_or_detached, sampling, mask, options["is_level"],
                                 options.get("is_mode", "truncate"), options.get("is_cap", 2.0))

    ours_logp, ours_entropy = logp0.clone().requires_grad_(), entropy0.clone().requires_grad_()
    theirs_logp, theirs_entropy = logp0.clone().requires_grad_(), entropy0.clone().requires_grad_()
    ours_total = theirs_total = 0.0
    size = B // micro_batches
    for start in range(0, B, size):
        rows = slice(start, start + size)
        lp = ours_logp[rows]
        out = loss(lp, old[rows] if old is not None else lp.detach(), sampling[rows], ref[rows], adv[rows],
                   mask[rows], num_items_in_batch=num_items, entropy=ours_entropy[rows], batch_rows=B)
        weighted = out.loss * loss.micro_weight(size, B)
        weighted.backward()
        ours_total += weighted.item()

        inputs = {"completion_mask": mask[rows], "advantages": adv[rows], "num_items_in_batch": num_items,
                  "sampling_per_token_logps": sampling[rows], "ref_per_token_logps": ref[rows]}
        if old is not None:
            inputs["old_per_token_logps"] = old[rows]
        if options["is_level"] != "none":
            inputs["importance_sampling_ratio"] = weights[rows]
        reference = trl_compute_loss(theirs_logp[rows], theirs_entropy[rows], inputs, trl_args(options),
                                     micro_batches)
        reference.backward()
        theirs_total += reference.item()

    assert ours_total == pytest.approx(theirs_total, rel=0, abs=1e-9)
    torch.testing.assert_close(ours_logp.grad, theirs_logp.grad, **TOL)
    torch.testing.assert_close(ours_entropy.grad, theirs_entropy.grad, **TOL)
    assert theirs_logp.grad.abs().sum() > 1e-3  # not a trivial zero gradient


def test_the_cases_exercise_every_objective_and_option():
    objectives = {GRPOLoss(**our_options(*case)).objective.__class__ for case in CASES}
    assert {cls for cls in OBJECTIVES.values()} == objectives
    assert {feature for _, _, feature in CASES} == set(FEATURES)


def test_options_have_effect_on_these_inputs():
    # The comparison above means something only if each option changes the loss on its inputs.
    logp, mask, old, sampling, ref, entropy, adv = random_step(7, True)

    def value(**options):
        out = GRPOLoss(**{**our_options("dapo", "token", "plain"), **options})(
            logp, old, sampling, ref, adv, mask, entropy=entropy)
        return out.loss.item(), out.metrics

    plain, _ = value()
    for option in FEATURES.values():
        if option:
            assert value(**option)[0] != pytest.approx(plain, abs=1e-6), option
    metrics = value(off_policy_mask_threshold=0.05, top_entropy_quantile=0.4)[1]
    assert 0 < metrics["off_policy_masked_frac"] < 1 and 0.5 < metrics["entropy_masked_frac"] < 0.7
    assert 0 < metrics["clip_frac_low"] and 0 < metrics["clip_frac_high"]
    assert metrics["clip_frac"] == pytest.approx(metrics["clip_frac_low"] + metrics["clip_frac_high"])
    assert metrics["ratio_min"] < 1 < metrics["ratio_max"]


@pytest.mark.slow
def test_transcribed_helpers_are_trls():
    from trl.trainer.grpo_trainer import GRPOTrainer

    logp, mask, old, sampling, _, _, adv = random_step(3, True)
    adv = adv.unsqueeze(1)
    torch.testing.assert_close(GRPOTrainer.get_off_policy_mask(adv, logp, sampling, mask, 0.05),
                               trl_get_off_policy_mask(adv, logp, sampling, mask, 0.05), rtol=0, atol=0)
    ratio = torch.exp(old - sampling)
    torch.testing.assert_close(GRPOTrainer.get_gamma_weights(adv, logp - old, mask, ratio),
                               trl_get_gamma_weights(adv, logp - old, mask, ratio), rtol=0, atol=0)


# --- options refused at start, by key ---------------------------------------------------------

@pytest.mark.parametrize("options, key", [
    ({"delta": 1.1, "epsilon_high": 0.2}, "loss.delta"),  # must be > 1 + epsilon_high
    ({"loss_type": "cispo", "epsilon_high": 0.28}, "loss.epsilon_high"),
    ({"loss_type": "sapo", "sapo_temperature_pos": 0.0}, "loss.sapo_temperature_pos"),
    ({"loss_type": "sapo", "sapo_temperature_neg": -1.0}, "loss.sapo_temperature_neg"),
    ({"loss_type": "vespo", "vespo_lambda_neg": 0.0}, "loss.vespo_lambda_neg"),
    ({"loss_type": "vespo", "vespo_k_pos": -1.0}, "loss.vespo_k_pos"),
    ({"loss_type": "luspo"}, "loss.importance_sampling_level"),  # luspo needs sequence-level ratios
    ({"loss_type": "vespo", "importance_sampling_level": "sequence"}, "loss.importance_sampling_level"),
    ({"loss_type": "vespo", "is_level": "sequence"}, "loss.is_level"),
    ({"importance_sampling_level": "batch"}, "loss.importance_sampling_level"),
    ({"objective": "ppo"}, "loss.objective"), ({"aggregation": "sum"}, "loss.aggregation"),
    ({"off_policy_mask_threshold": -0.1}, "loss.off_policy_mask_threshold"),
    ({"top_entropy_quantile": 0.0}, "loss.top_entropy_quantile"),
    ({"entropy_coef_min": 2.0}, "loss.entropy_coef_min"),
])
def test_bad_options_fail_at_start_naming_the_key(options, key):
    with pytest.raises(ValueError, match=key):
        GRPOLoss(**options)


def test_objective_and_aggregation_are_separate_axes():
    # cispo's objective under grpo's aggregation: the per-sequence mean of cispo's per-token loss.
    logp, mask, _, sampling, ref, _, adv = random_step(5, False)
    mask[3, 0] = 1.0
    per_token = -adv.unsqueeze(1) * logp  # on policy the capped ratio is 1
    want = ((per_token * mask).sum(-1) / mask.sum(-1)).mean()
    got = GRPOLoss(objective="cispo", aggregation="grpo", epsilon_high=5.0, is_level="none")(logp, logp, sampling, ref, adv, mask)
    torch.testing.assert_close(got.loss, want, **TOL)


def test_adaptive_entropy_coefficient_follows_trl_and_round_trips():
    # TRL: +delta (capped at max) when the step's entropy <= target, -delta (floored at min) otherwise;
    # the bonus applies only once a measured entropy was <= target.
    loss = GRPOLoss(use_adaptive_entropy=True, entropy_coef=0.01, entropy_coef_delta=0.02, entropy_target=0.5,
                    entropy_coef_max=0.04)
    logp = torch.zeros(1, 2, dtype=F64)
    mask = torch.ones(1, 2, dtype=F64)
    coefs, bonus = [], []
    for h in (0.4, 0.4, 0.4, 0.9):
        out = loss(logp, logp, logp, None, torch.zeros(1, dtype=F64), mask, entropy=torch.full((1, 2), h, dtype=F64))
        bonus.append(out.loss.item())
        loss.after_update()
        coefs.append(loss.entropy_bonus.coef)
    assert coefs == pytest.approx([0.03, 0.04, 0.04, 0.02])
    assert bonus == pytest.approx([0.0, -0.03 * 0.4, -0.04 * 0.4, -0.04 * 0.9])
    restored = GRPOLoss(use_adaptive_entropy=True)
    restored.load_state_dict(loss.state_dict())
    assert restored.entropy_bonus.coef == 0.02 and restored.entropy_bonus.last_entropy == pytest.approx(0.9)
