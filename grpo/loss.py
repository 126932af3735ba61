"""The GRPO loss on per-token logprobs: a policy objective (grpo/objectives.py: clipped
surrogate, CISPO, SAPO, VESPO) on token- or sequence-level ratios, optional k3 KL to a reference,
the vLLM/trainer mismatch correction, sequence and token masks (off-policy, high-entropy), an
entropy bonus, and a registry of ways to average tokens into one scalar.

`loss.loss_type` names one of TRL 1.16's presets (objective + aggregation, `LOSS_TYPES`);
`GRPOLoss` is the configured component (`loss:` in the config, built at start, where it checks
its options by key); `grpo_loss` is the same computation as one function call.

Shapes: B sequences (one micro-batch), T completion positions; `mask` [B, T] is 1 on real
completion tokens and 0 on padding.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from grpo.entropy_bonus import EntropyBonus
from grpo.objectives import OBJECTIVES, build_objective, masked_mean, require

Aggregation = Callable[..., Tensor]


def by_rows(micro_rows: int, batch_rows: int) -> float:
    """Weight of a micro-batch whose loss is a mean over its own rows: its share of the rows."""
    return micro_rows / batch_rows


class Aggregator(NamedTuple):
    """A registered aggregation: how tokens become one scalar, and how micro-batches add up."""

    aggregate: Aggregation  # (per_token [B, T], mask [B, T], *, max_completion_length, num_items_in_batch)
    micro_weight: Callable[[int, int], float]  # (micro-batch rows, batch rows) -> weight of its loss


AGGREGATIONS: dict[str, Aggregator] = {}


def register_aggregation(name: str, micro_weight: Callable[[int, int], float] = by_rows) \
        -> Callable[[Aggregation], Aggregation]:
    """Add an aggregation `fn(per_token [B, T], mask [B, T], *, max_completion_length,
    num_items_in_batch) -> scalar` under `name`, with the weight its micro-batch losses get when
    gradients accumulate, so a new aggregation is one decorated function."""

    def add(fn: Aggregation) -> Aggregation:
        AGGREGATIONS[name] = Aggregator(fn, micro_weight)
        return fn

    return add


def get_aggregation(name: str) -> Aggregation:
    """The aggregation registered as `name`; ValueError listing the valid names otherwise."""
    if name not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {name!r}; valid: {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[name].aggregate


@register_aggregation("grpo")
def _grpo(per_token: Tensor, mask: Tensor, **_) -> Tensor:
    """Mean over sequences of each sequence's token mean: every completion weighs the same,
    so tokens of long completions weigh less (the length bias Dr. GRPO and DAPO remove)."""
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


@register_aggregation("bnpo")
def _bnpo(per_token: Tensor, mask: Tensor, **_) -> Tensor:
    """Token mean over this micro-batch: every token weighs the same within it."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


@register_aggregation("dr_grpo")
def _dr_grpo(per_token: Tensor, mask: Tensor, *, max_completion_length: Optional[int] = None, **_) -> Tensor:
    """Token sum over a constant B * max_completion_length (T when not given), so no
    normaliser depends on the completions' lengths."""
    length = per_token.shape[1] if max_completion_length is None else max_completion_length
    return (per_token * mask).sum() / (per_token.shape[0] * length)


# Already divided by the whole step's token count: micro-batch losses simply add up.
@register_aggregation("dapo", micro_weight=lambda micro_rows, batch_rows: 1.0)
def _dapo(per_token: Tensor, mask: Tensor, *, num_items_in_batch: Union[int, Tensor, None] = None, **_) -> Tensor:
    """Token sum over the completion-token count of the whole step (`num_items_in_batch`), so
    summing the micro-batches' losses gives exactly the full batch's token mean; without it,
    this micro-batch's count."""
    count = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=mask.dtype)
    return (per_token * mask).sum() / count.clamp(min=1.0)


@register_aggregation("luspo")
def _luspo(per_token: Tensor, mask: Tensor, **_) -> Tensor:
    """Mean over sequences of each sequence's token sum: with a sequence-level ratio, each
    sequence's loss scaled by its length (LUSPO, length-unbiased sequence policy optimization)."""
    return (per_token * mask).sum(-1).mean()


class LossType(NamedTuple):
    """A `loss.loss_type` preset (TRL's names): the objective and the aggregation it pairs."""

    objective: str
    aggregation: str


# TRL 1.16's loss types: the clipped surrogate under four aggregations, and the other objectives
# with the aggregation TRL gives each (`loss.objective` / `loss.aggregation` override either).
LOSS_TYPES: dict[str, LossType] = {
    "grpo": LossType("clip", "grpo"), "bnpo": LossType("clip", "bnpo"), "dr_grpo": LossType("clip", "dr_grpo"),
    "dapo": LossType("clip", "dapo"), "cispo": LossType("cispo", "dapo"), "sapo": LossType("sapo", "grpo"),
    "luspo": LossType("clip", "luspo"), "vespo": LossType("vespo", "dapo"),
}
# Aggregations that only mean something over sequence-level ratios.
SEQUENCE_AGGREGATIONS = {"luspo"}


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 estimator of KL(policy || ref) per token [B, T]: exp(d) - d - 1 with d = ref - logp;
    unbiased, always >= 0, and 0 exactly where the two logprobs agree."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


# Levels map masked per-token log-weights [B, T] to the log-weights actually used [B, T].
_IS_LEVELS: dict[str, Callable[[Tensor], Tensor]] = {
    "token": lambda log_w: log_w,
    "sequence": lambda log_w: log_w.sum(-1, keepdim=True).expand_as(log_w),
    "none": torch.zeros_like,
}
_IS_MODES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "truncate": lambda w, cap: w.clamp(max=cap),
    "mask": lambda w, cap: torch.where(w <= cap, w, torch.zeros_like(w)),
}


def importance_weights(
    old_logp: Tensor, sampling_logp: Tensor, mask: Tensor, level: str, mode: str, cap: float
) -> Tensor:
    """Detached weights [B, T] for sampling from vLLM while the objective is under the trainer's
    policy: pi_trainer / pi_vllm per token ("token"), its product over the sequence broadcast to
    its tokens ("sequence"), or ones ("none"). Weights above `cap` are cut to `cap` ("truncate")
    or zeroed ("mask"), which bounds the variance (TRL's vllm_importance_sampling_correction).

    old_logp, sampling_logp, mask: [B, T]; padding contributes log-weight 0 whatever it holds.
    """
    if level not in _IS_LEVELS:
        raise ValueError(f"unknown importance-sampling level {level!r}; valid: {sorted(_IS_LEVELS)}")
    if mode not in _IS_MODES:
        raise ValueError(f"unknown importance-sampling mode {mode!r}; valid: {sorted(_IS_MODES)}")
    if cap < 1.0:
        raise ValueError(f"importance-sampling cap {cap!r} must be >= 1, or on-policy tokens are cut")
    with torch.no_grad():
        log_w = torch.where(mask.bool(), old_logp - sampling_logp, torch.zeros_like(old_logp))
        return _IS_MODES[mode](torch.exp(_IS_LEVELS[level](log_w)), cap)


# pi_theta / pi_old per token, or GSPO's (arXiv 2507.18071) per sequence: the exp of the mean
# token log-ratio, broadcast to the sequence's tokens (the gradient reaches every token).
RATIO_LEVELS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "token": lambda log_ratio, mask: log_ratio,
    "sequence": lambda log_ratio, mask: ((log_ratio * mask).sum(-1, keepdim=True)
                                         / mask.sum(-1, keepdim=True).clamp(min=1.0)).expand_as(log_ratio),
}


def off_policy_mask(advantages: Tensor, logp: Tensor, sampling_logp: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask [B, 1] (arXiv 2512.02556, eq. 9): 0 for a
    negative-advantage sequence whose mean log(pi_sampler / pi_theta) over its tokens exceeds
    `threshold`, 1 otherwise; advantages [B, 1]. A NaN logprob gives no evidence (counts 0)."""
    kl = torch.nan_to_num(sampling_logp - logp.detach(), nan=0.0)
    mean_kl = (kl * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean_kl <= threshold)).to(mask.dtype)


def high_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """1 on the real tokens [B, T] whose entropy is at least the (1 - quantile) quantile of this
    micro-batch's real tokens' entropies (the top `quantile` of them: arXiv 2506.01939), else 0.
    TRL takes the quantile over the micro-batch of every process; with torchrun ours is each
    process's own share."""
    real = entropy.detach()[mask.bool()]
    if real.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(real.double(), 1.0 - quantile).to(entropy.dtype)
    return ((entropy.detach() * mask >= threshold) & mask.bool()).to(mask.dtype)


class LossOutput(NamedTuple):
    """`loss`: scalar to backpropagate; `metrics`: detached masked means for logging."""

    loss: Tensor
    metrics: dict[str, float]


def _masked_extreme(values: Tensor, mask: Tensor, reduce: Callable[[Tensor], Tensor], fill: float) -> float:
    """max or min of `values` [B, T] over the real tokens (0.0 if none)."""
    if not mask.bool().any():
        return 0.0
    return reduce(torch.where(mask.bool(), values.detach(), torch.full_like(values, fill))).item()


class GRPOLoss:
    """The `loss:` component. Built at start, so a bad option fails before vLLM starts, by its key;
    called once per micro-batch.

    Options beyond the objective's (TRL 1.16's GRPOConfig names): `importance_sampling_level`
    token | sequence (GSPO) for pi_theta / pi_old; `off_policy_mask_threshold` (None: off);
    `top_entropy_quantile` in (0, 1] (1: every token trains); the entropy bonus
    (grpo/entropy_bonus.py); `use_bias_correction_kl` multiplies the k3 KL by the ratio (TRL's
    default is True; ours False keeps the plain k3 term). `is_level`, `is_mode`, `is_cap` are the
    vLLM/trainer mismatch correction (`importance_weights`), a separate thing.
    """

    def __init__(self, loss_type: str = "grpo", epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                 beta: float = 0.0, is_level: str = "token", is_mode: str = "truncate", is_cap: float = 2.0,
                 max_completion_length: Optional[int] = None, objective: Optional[str] = None,
                 aggregation: Optional[str] = None, importance_sampling_level: str = "token",
                 delta: Optional[float] = None, off_policy_mask_threshold: Optional[float] = None,
                 top_entropy_quantile: float = 1.0, use_bias_correction_kl: bool = False,
                 sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
                 vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
                 vespo_lambda_neg: float = 2.0, entropy_coef: float = 0.0, use_adaptive_entropy: bool = False,
                 entropy_coef_min: float = 0.0, entropy_coef_max: float = 1.0, entropy_coef_delta: float = 0.005,
                 entropy_target: float = 0.2):
        for key, value, valid in (("loss_type", loss_type, LOSS_TYPES), ("is_level", is_level, _IS_LEVELS),
                                  ("is_mode", is_mode, _IS_MODES), ("objective", objective, OBJECTIVES),
                                  ("aggregation", aggregation, AGGREGATIONS),
                                  ("importance_sampling_level", importance_sampling_level, RATIO_LEVELS)):
            require(key, value, value in valid or (value is None and key in ("objective", "aggregation")),
                    f"must be one of {sorted(valid)}")
        # A negative beta would reward drifting from the reference; a cap below 1 cuts on-policy tokens.
        for key, value, low in (("epsilon_low", epsilon_low, 0), ("epsilon_high", epsilon_high, 0),
                                ("beta", beta, 0), ("is_cap", is_cap, 1)):
            require(key, value, value >= low, f"must be >= {low}")
        require("off_policy_mask_threshold", off_policy_mask_threshold,
                off_policy_mask_threshold is None or off_policy_mask_threshold >= 0,
                "must be >= 0 (a mean log-ratio bound) or null")
        require("top_entropy_quantile", top_entropy_quantile, 0 < top_entropy_quantile <= 1, "must be in (0, 1]")
        preset = LOSS_TYPES[loss_type]
        objective, aggregation = objective or preset.objective, aggregation or preset.aggregation
        require("importance_sampling_level", importance_sampling_level,
                aggregation not in SEQUENCE_AGGREGATIONS or importance_sampling_level == "sequence",
                f"aggregation {aggregation} scales each sequence's loss by its length, which only means "
                "something for sequence-level ratios: set loss.importance_sampling_level=sequence")
        require("is_level", is_level, objective != "vespo" or is_level != "sequence",
                "vespo folds token-level vLLM weights into its sequence weight: use is_level=token or none")
        self.objective = build_objective(
            objective, importance_sampling_level, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
            sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
            vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
            vespo_lambda_neg=vespo_lambda_neg)
        self.entropy_bonus = EntropyBonus(entropy_coef, use_adaptive_entropy, entropy_coef_min, entropy_coef_max,
                                          entropy_coef_delta, entropy_target)
        self.kind = AGGREGATIONS[aggregation]
        self.beta = beta
        self.is_options = (is_level, is_mode, is_cap)
        self.ratio_level, self.bias_correction_kl = RATIO_LEVELS[importance_sampling_level], use_bias_correction_kl
        self.off_policy_threshold, self.entropy_quantile = off_policy_mask_threshold, top_entropy_quantile
        self.max_completion_length = max_completion_length

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0

    @property
    def needs_entropy_grad(self) -> bool:
        """Whether the entropy must carry a gradient (the bonus trains on it)."""
        return self.entropy_bonus.enabled

    def micro_weight(self, micro_rows: int, batch_rows: int) -> float:
        """What this micro-batch's loss is multiplied by before backward, so the accumulated
        gradient is the whole batch's."""
        return self.kind.micro_weight(micro_rows, batch_rows)

    def after_update(self, reduce: Callable[[dict], dict] = lambda totals: totals) -> None:
        """Called after each optimizer step: the adaptive entropy coefficient moves (`reduce` sums
        a dict over trainer processes)."""
        self.entropy_bonus.after_update(reduce)

    def state_dict(self) -> dict:
        return {"entropy_bonus": self.entropy_bonus.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.entropy_bonus.load_state_dict(state["entropy_bonus"])

    def __call__(self, logp: Tensor, old_logp: Tensor, sampling_logp: Tensor, ref_logp: Optional[Tensor],
                 advantages: Tensor, mask: Tensor, num_items_in_batch: Union[int, Tensor, None] = None,
                 entropy: Optional[Tensor] = None, batch_rows: Optional[int] = None) -> LossOutput:
        """Loss of one micro-batch. logp [B, T] carries the gradient; old_logp [B, T] is the
        trainer's logprob at rollout time (a constant); sampling_logp [B, T] is vLLM's; ref_logp
        [B, T] or None (only with beta == 0); advantages [B]; mask [B, T]; entropy [B, T] (with a
        gradient for the entropy bonus; needed by it and by top_entropy_quantile < 1); batch_rows:
        the step's rows, so the bonus weighs each micro-batch by its rows whatever the aggregation.

        As in TRL, the vLLM weight scales the policy term only, and beta * k3 is added after."""
        if self.beta > 0 and ref_logp is None:
            raise ValueError(f"beta={self.beta!r} > 0 needs ref_logp, got None")
        if entropy is None and (self.entropy_quantile < 1 or self.entropy_bonus.enabled):
            raise ValueError("top_entropy_quantile < 1 and the entropy bonus need the tokens' entropy, got None")
        mask = mask.to(logp.dtype)
        adv = advantages.unsqueeze(1)
        log_ratio = logp - old_logp.detach()
        ratio = torch.exp(self.ratio_level(log_ratio, mask))
        weights = importance_weights(old_logp, sampling_logp, mask, *self.is_options)
        raw = importance_weights(old_logp, sampling_logp, mask, *self.is_options[:2], torch.inf)  # before the cap
        per_token, objective_metrics = self.objective(ratio, logp, log_ratio, adv, mask, weights)
        keep, top = torch.ones_like(mask[:, :1]), mask  # sequences kept [B, 1], high-entropy tokens [B, T]
        if self.off_policy_threshold is not None:
            keep = off_policy_mask(adv, logp, sampling_logp, mask, self.off_policy_threshold)
            per_token = per_token * keep
        if self.entropy_quantile < 1:
            top = high_entropy_mask(entropy, mask, self.entropy_quantile)
            per_token = per_token * top
        kl = None if ref_logp is None else kl_k3(logp, ref_logp)
        if self.beta > 0:
            per_token = per_token + self.beta * (kl * ratio if self.bias_correction_kl else kl)
        loss = self.kind.aggregate(per_token, mask, max_completion_length=self.max_completion_length,
                                   num_items_in_batch=num_items_in_batch)
        if self.entropy_bonus.enabled:  # a token mean weighted by rows, whatever the aggregation
            rows, total = logp.shape[0], batch_rows or logp.shape[0]
            loss = loss + self.entropy_bonus(entropy, top) * by_rows(rows, total) / self.micro_weight(rows, total)
        low, high = (ratio < self.objective.bounds[0]) & (adv < 0), (ratio > self.objective.bounds[1]) & (adv > 0)
        metrics = {
            **objective_metrics,
            "clip_frac": masked_mean((low | high).to(mask.dtype), mask),  # clipped region (TRL's region_mean)
            "clip_frac_low": masked_mean(low.to(mask.dtype), mask),
            "clip_frac_high": masked_mean(high.to(mask.dtype), mask),
            "kl": 0.0 if kl is None else masked_mean(kl, mask),
            "is_weight_mean": masked_mean(weights, mask),
            # Largest uncapped weight of this micro-batch (optimize averages it over micro-batches).
            "is_weight_max": torch.where(mask.bool(), raw, torch.zeros_like(raw)).max().item(),
            "is_cut_frac": masked_mean((raw > self.is_options[2]).to(mask.dtype), mask),  # cut/masked by is_cap
            "logprob_gap": masked_mean((old_logp - sampling_logp).abs(), mask),
            "ratio_mean": masked_mean(ratio, mask),
            # This micro-batch's extremes (optimize averages them over micro-batches, as is_weight_max).
            "ratio_min": _masked_extreme(ratio, mask, torch.min, math.inf),
            "ratio_max": _masked_extreme(ratio, mask, torch.max, -math.inf),
            "off_policy_masked_frac": 1.0 - masked_mean(keep, mask),  # tokens of sequences off_policy_mask drops
            "entropy_masked_frac": 1.0 - masked_mean(top, mask),  # tokens below the top_entropy_quantile
            "entropy_coef": self.entropy_bonus.coef,
        }
        return LossOutput(loss, metrics)


def grpo_loss(logp: Tensor, old_logp: Tensor, sampling_logp: Tensor, ref_logp: Optional[Tensor], advantages: Tensor,
              mask: Tensor, *, num_items_in_batch: Union[int, Tensor, None] = None, entropy: Optional[Tensor] = None,
              batch_rows: Optional[int] = None, **options) -> LossOutput:
    """`GRPOLoss(**options)` on one micro-batch: the loss as one function call."""
    return GRPOLoss(**options)(logp, old_logp, sampling_logp, ref_logp, advantages, mask,
                               num_items_in_batch=num_items_in_batch, entropy=entropy, batch_rows=batch_rows)
