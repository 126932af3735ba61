"""The GRPO objective on per-token logprobs: clipped surrogate, optional k3 KL to a reference,
vLLM/trainer mismatch correction, and a registry of ways to average tokens into one scalar.

`GRPOLoss` is the configured component (`loss:` in the config, built at start, where it checks
its options); the pure functions below are what it computes.

Shapes: B sequences (one micro-batch), T completion positions; `mask` [B, T] is 1 on real
completion tokens and 0 on padding.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

Aggregation = Callable[..., Tensor]


def by_rows(micro_rows: int, batch_rows: int) -> float:
    """Weight of a micro-batch whose loss is a mean over its own rows: its share of the rows."""
    return micro_rows / batch_rows


class LossType(NamedTuple):
    """A registered loss type: how tokens become one scalar, and how micro-batches add up."""

    aggregate: Aggregation  # (per_token [B, T], mask [B, T], *, max_completion_length, num_items_in_batch)
    micro_weight: Callable[[int, int], float]  # (micro-batch rows, batch rows) -> weight of its loss


_LOSSES: dict[str, LossType] = {}


def register_loss(name: str, micro_weight: Callable[[int, int], float] = by_rows) -> Callable[[Aggregation], Aggregation]:
    """Add an aggregation `fn(per_token [B, T], mask [B, T], *, max_completion_length,
    num_items_in_batch) -> scalar` under `name`, with the weight its micro-batch losses get when
    gradients accumulate, so a new loss type is one decorated function."""

    def add(fn: Aggregation) -> Aggregation:
        _LOSSES[name] = LossType(fn, micro_weight)
        return fn

    return add


def get_loss(name: str) -> Aggregation:
    """The aggregation registered as `name`; ValueError listing the valid names otherwise."""
    if name not in _LOSSES:
        raise ValueError(f"unknown loss_type {name!r}; valid: {sorted(_LOSSES)}")
    return _LOSSES[name].aggregate


@register_loss("grpo")
def _grpo(per_token: Tensor, mask: Tensor, **_) -> Tensor:
    """Mean over sequences of each sequence's token mean: every completion weighs the same,
    so tokens of long completions weigh less (the length bias Dr. GRPO and DAPO remove)."""
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


@register_loss("bnpo")
def _bnpo(per_token: Tensor, mask: Tensor, **_) -> Tensor:
    """Token mean over this micro-batch: every token weighs the same within it."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


@register_loss("dr_grpo")
def _dr_grpo(per_token: Tensor, mask: Tensor, *, max_completion_length: Optional[int] = None, **_) -> Tensor:
    """Token sum over a constant B * max_completion_length (T when not given), so no
    normaliser depends on the completions' lengths."""
    length = per_token.shape[1] if max_completion_length is None else max_completion_length
    return (per_token * mask).sum() / (per_token.shape[0] * length)


# Already divided by the whole step's token count: micro-batch losses simply add up.
@register_loss("dapo", micro_weight=lambda micro_rows, batch_rows: 1.0)
def _dapo(per_token: Tensor, mask: Tensor, *, num_items_in_batch: Union[int, Tensor, None] = None, **_) -> Tensor:
    """Token sum over the completion-token count of the whole step (`num_items_in_batch`), so
    summing the micro-batches' losses gives exactly the full batch's token mean; without it,
    this micro-batch's count."""
    count = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=mask.dtype)
    return (per_token * mask).sum() / count.clamp(min=1.0)


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


class LossOutput(NamedTuple):
    """`loss`: scalar to backpropagate; `metrics`: detached masked means for logging."""

    loss: Tensor
    metrics: dict[str, float]


def _masked_mean(values: Tensor, mask: Tensor) -> float:
    """Mean of `values` [B, T] over the tokens where `mask` is set, as a float (0.0 if none)."""
    kept = torch.where(mask.bool(), values.detach(), torch.zeros_like(values))
    return (kept.sum() / mask.sum().clamp(min=1.0)).item()


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    sampling_logp: Tensor,
    ref_logp: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    is_level: str = "token",
    is_mode: str = "truncate",
    is_cap: float = 2.0,
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Union[int, Tensor, None] = None,
) -> LossOutput:
    """Clipped-surrogate GRPO loss of one micro-batch.

    logp [B, T] carries the gradient; old_logp [B, T] is the trainer's logprob at rollout time
    (treated as a constant); sampling_logp [B, T] is vLLM's; ref_logp [B, T] or None (only
    allowed with beta == 0); advantages [B], one per sequence; mask [B, T].

    As in TRL, the importance weight scales the policy term only, and beta * k3 is added after.
    """
    aggregate = get_loss(loss_type)
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta!r} > 0 needs ref_logp, got None")
    mask = mask.to(logp.dtype)
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logp - old_logp.detach())
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    weights = importance_weights(old_logp, sampling_logp, mask, is_level, is_mode, is_cap)
    raw = importance_weights(old_logp, sampling_logp, mask, is_level, is_mode, torch.inf)  # before the cap
    per_token = -torch.min(ratio * adv, clipped * adv) * weights
    kl = None if ref_logp is None else kl_k3(logp, ref_logp)
    if beta > 0:
        per_token = per_token + beta * kl
    loss = aggregate(
        per_token, mask, max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch
    )
    clip_active = ((ratio < 1.0 - epsilon_low) & (adv < 0)) | ((ratio > 1.0 + epsilon_high) & (adv > 0))
    metrics = {
        "clip_frac": _masked_mean(clip_active.to(mask.dtype), mask),
        "kl": 0.0 if kl is None else _masked_mean(kl, mask),
        "is_weight_mean": _masked_mean(weights, mask),
        # Largest uncapped weight of this micro-batch (optimize averages it over micro-batches).
        "is_weight_max": torch.where(mask.bool(), raw, torch.zeros_like(raw)).max().item(),
        "is_cut_frac": _masked_mean((raw > is_cap).to(mask.dtype), mask),  # tokens truncated/masked by is_cap
        "logprob_gap": _masked_mean((old_logp - sampling_logp).abs(), mask),
        "ratio_mean": _masked_mean(ratio, mask),
    }
    return LossOutput(loss, metrics)


class GRPOLoss:
    """The `loss:` component. Built at start, so a bad option fails before vLLM starts, by name;
    called once per micro-batch with the tensors of `grpo_loss`."""

    def __init__(self, loss_type: str = "grpo", epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                 beta: float = 0.0, is_level: str = "token", is_mode: str = "truncate", is_cap: float = 2.0,
                 max_completion_length: Optional[int] = None):
        for key, value, valid in (("loss_type", loss_type, _LOSSES), ("is_level", is_level, _IS_LEVELS),
                                  ("is_mode", is_mode, _IS_MODES)):
            if value not in valid:
                raise ValueError(f"loss.{key}={value!r}: must be one of {sorted(valid)}")
        # A negative beta would reward drifting from the reference; a cap below 1 cuts on-policy tokens.
        for key, value, low in (("epsilon_low", epsilon_low, 0), ("epsilon_high", epsilon_high, 0),
                                ("beta", beta, 0), ("is_cap", is_cap, 1)):
            if not value >= low:
                raise ValueError(f"loss.{key}={value!r}: must be >= {low}")
        self.kind = _LOSSES[loss_type]
        self.beta = beta
        self.options = dict(loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
                            is_level=is_level, is_mode=is_mode, is_cap=is_cap,
                            max_completion_length=max_completion_length)

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0

    def micro_weight(self, micro_rows: int, batch_rows: int) -> float:
        """What this micro-batch's loss is multiplied by before backward, so the accumulated
        gradient is the whole batch's."""
        return self.kind.micro_weight(micro_rows, batch_rows)

    def __call__(self, logp: Tensor, old_logp: Tensor, sampling_logp: Tensor, ref_logp: Optional[Tensor],
                 advantages: Tensor, mask: Tensor, num_items_in_batch: Union[int, Tensor, None] = None) -> LossOutput:
        return grpo_loss(logp, old_logp, sampling_logp, ref_logp, advantages, mask,
                         num_items_in_batch=num_items_in_batch, **self.options)
