"""Policy objectives: the per-token policy term a GRPO loss is built on, one registered class each
(`loss.objective`, or the one `loss.loss_type` names, grpo/loss.py).

Every objective maps the importance ratio `ratio` = pi_theta / pi_old [B, T] (per token, or the
sequence's broadcast to its tokens: `loss.importance_sampling_level`), the trainer's logprobs
`logp` [B, T], the per-token log-ratio [B, T], advantages [B, 1], the mask [B, T] and the vLLM
correction weights `is_weights` [B, T] to the per-token policy loss [B, T] with those weights
applied (VESPO folds them into its sequence weight instead), plus its own metrics. The formulas
are TRL 1.16's (`GRPOTrainer._compute_loss`, trl/trainer/grpo_trainer.py); each class names its
paper. Options are checked in the constructor, by key, before anything starts.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Protocol

import torch
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor) -> float:
    """Mean of `values` [B, T] (or [B, 1], broadcast) over the tokens where `mask` is set, as a
    float (0.0 if none)."""
    values = values.detach().expand_as(mask)
    kept = torch.where(mask.bool(), values, torch.zeros_like(values))
    return (kept.sum() / mask.sum().clamp(min=1.0)).item()


def require(key: str, value, ok: bool, need: str) -> None:
    """Bad option -> ValueError naming `loss.<key>`, its value and what it must be."""
    if not ok:
        raise ValueError(f"loss.{key}={value!r}: {need}")


class Objective(Protocol):
    sequence_level: Optional[bool]  # True: needs sequence-level ratios, False: token-level, None: either
    # Ratios below the first (A < 0) or above the second (A > 0) count as clipped in the metrics:
    # the hard clip's bounds, or the trust region [1 - eps_low, 1 + eps_high] a soft objective replaces.
    bounds: tuple[float, float]

    def __call__(self, ratio: Tensor, logp: Tensor, log_ratio: Tensor, adv: Tensor, mask: Tensor,
                 is_weights: Tensor) -> tuple[Tensor, dict[str, float]]: ...


OBJECTIVES: dict[str, Callable[..., Objective]] = {}


def register_objective(name: str):
    """Add an objective class under `name`; it is built with the `loss:` options as keywords and
    takes what it uses (`**_` for the rest)."""

    def add(cls):
        OBJECTIVES[name] = cls
        return cls

    return add


@register_objective("clip")
class ClippedSurrogate:
    """PPO/GRPO: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A). With `delta` (INTELLECT-2,
    arXiv 2505.07291) the unclipped ratio is also capped at delta, so a negative-advantage token
    whose ratio exploded cannot dominate the step (two-sided clipping)."""

    sequence_level = None

    def __init__(self, epsilon_low: float = 0.2, epsilon_high: float = 0.2, delta: Optional[float] = None, **_):
        require("delta", delta, delta is None or delta > 1 + epsilon_high,
                f"must be > 1 + epsilon_high = {1 + epsilon_high} (or null), or it clips inside the trust region")
        self.bounds, self.delta = (1.0 - epsilon_low, 1.0 + epsilon_high), delta

    def __call__(self, ratio, logp, log_ratio, adv, mask, is_weights):
        clipped = ratio.clamp(*self.bounds)
        capped = ratio if self.delta is None else ratio.clamp(max=self.delta)
        return -torch.min(capped * adv, clipped * adv) * is_weights, {}


@register_objective("cispo")
class CISPO:
    """MiniMax-M1 / ScaleRL (arXiv 2510.13786): REINFORCE on logp with the detached ratio capped
    at epsilon_high (their eps_max, e.g. 5.0), so no token's gradient is ever dropped by a clip."""

    sequence_level = None

    def __init__(self, epsilon_high: float = 0.2, **_):
        require("epsilon_high", epsilon_high, epsilon_high >= 1,
                "cispo caps the ratio itself at epsilon_high (ScaleRL's eps_max, e.g. 5.0): below 1 it "
                "would cut on-policy tokens")
        self.cap, self.bounds = epsilon_high, (0.0, epsilon_high)  # TRL's cispo_clip_ratio: r > cap, A > 0

    def __call__(self, ratio, logp, log_ratio, adv, mask, is_weights):
        return -ratio.clamp(max=self.cap).detach() * adv * logp * is_weights, {}


@register_objective("sapo")
class SAPO:
    """Soft Adaptive Policy Optimization (arXiv 2511.20347): the hard clip becomes a sigmoid gate
    4/tau * sigmoid(tau (r - 1)), with its own temperature for positive and other advantages."""

    sequence_level = None

    def __init__(self, sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
                 epsilon_low: float = 0.2, epsilon_high: float = 0.2, **_):
        self.bounds = (1.0 - epsilon_low, 1.0 + epsilon_high)
        for key, value in (("sapo_temperature_pos", sapo_temperature_pos),
                           ("sapo_temperature_neg", sapo_temperature_neg)):
            require(key, value, value > 0, "must be > 0 (it divides the gate)")
        self.pos, self.neg = sapo_temperature_pos, sapo_temperature_neg

    def __call__(self, ratio, logp, log_ratio, adv, mask, is_weights):
        tau = torch.where(adv > 0, self.pos, self.neg)
        gate = torch.sigmoid(tau * (ratio - 1)) * 4 / tau
        return -gate * adv * is_weights, {}


@register_objective("vespo")
class VESPO:
    """Variational sequence-level soft policy optimization: REINFORCE on logp weighted by the
    detached gamma weight phi(w) = e^lambda w^k e^(-lambda w) of the sequence ratio w (which
    includes the vLLM correction, token-level, in log space), with (k, lambda) by advantage sign."""

    sequence_level = False  # it builds its own sequence ratio from the token ones

    def __init__(self, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
                 vespo_lambda_neg: float = 2.0, epsilon_low: float = 0.2, epsilon_high: float = 0.2, **_):
        self.bounds = (1.0 - epsilon_low, 1.0 + epsilon_high)
        for key, value in (("vespo_k_pos", vespo_k_pos), ("vespo_k_neg", vespo_k_neg)):
            require(key, value, value >= 0, "must be >= 0 (the power of w)")
        for key, value in (("vespo_lambda_pos", vespo_lambda_pos), ("vespo_lambda_neg", vespo_lambda_neg)):
            require(key, value, value > 0, "must be > 0 (the decay of w)")
        self.k, self.lam = (vespo_k_pos, vespo_k_neg), (vespo_lambda_pos, vespo_lambda_neg)

    @torch.no_grad()
    def gamma_weights(self, log_ratio: Tensor, adv: Tensor, mask: Tensor, is_weights: Tensor) -> Tensor:
        floor = math.log(1e-8)
        seq = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
        seq = seq + is_weights.log().clamp(floor, 20.0).sum(-1, keepdim=True)
        log_w = seq.clamp(floor, 20.0)
        nonneg = adv >= 0
        k = torch.where(nonneg, self.k[0], self.k[1])
        lam = torch.where(nonneg, self.lam[0], self.lam[1])
        return torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)

    def __call__(self, ratio, logp, log_ratio, adv, mask, is_weights):
        phi = self.gamma_weights(log_ratio, adv, mask, is_weights)  # [B, 1]
        return -phi * adv * logp, {"vespo_phi_mean": masked_mean(phi, mask)}


def build_objective(name: str, importance_sampling_level: str, **options) -> Objective:
    """The objective `name` with its options checked, refused with a ratio level it cannot use."""
    require("objective", name, name in OBJECTIVES, f"must be one of {sorted(OBJECTIVES)}")
    objective = OBJECTIVES[name](**options)
    need = objective.sequence_level
    require("importance_sampling_level", importance_sampling_level,
            need is None or need == (importance_sampling_level == "sequence"),
            f"{name} needs importance_sampling_level={'sequence' if need else 'token'}"
            + (" (it scales each sequence's loss by its length)" if need else
               " (it builds its own sequence ratio from the token ratios)"))
    return objective
