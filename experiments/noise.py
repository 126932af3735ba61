"""A stand-in for an optimizer step in the sync benchmarks: every trainable weight moves by noise."""

from __future__ import annotations

import torch


@torch.no_grad()
def perturb(run, noise: float) -> None:
    with run.bridge.step_context():  # bridges that share memory with vLLM pause it here
        for p in run.policy.trainable_parameters():
            p.add_(torch.randn_like(p), alpha=noise)
