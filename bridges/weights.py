"""What vLLM should serve, read from the trainer: the one source of weights every pushing bridge
(reload, legacy, broadcast over gloo or NCCL) consumes.

`Weights(policy)` gives the tensors under the HF checkpoint's names (what vLLM's `load_weights`
maps), at the served dtype (bf16 served from fp32 masters: half the bytes, nothing for vLLM to
convert), with the LoRA adapter merged when finetune=lora (W + alpha/r B A beside the trainer's
model, bridges/lora_merge.py): vLLM then serves plain weights whatever the sync.
A model sharded over trainer processes (FSDP2) reaches rank 0 bucket by bucket through
`runtime.distributed.gather_to_main`: every rank takes part in each gather, rank 0 consumes.
"""

from __future__ import annotations

from typing import Callable

import torch

from bridges.lora_merge import MergedLora
from bridges.safetensors_mirror import distinct, storage_key
from runtime import distributed


def served(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`tensors` as vLLM holds them: floating ones cast to `dtype` (uncast where they are it
    already). Tensors that alias each other (tied embeddings) stay one tensor after the cast."""
    cast: dict[tuple, torch.Tensor] = {}

    def one(t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if t.is_floating_point() and key not in cast:
            cast[key] = t.to(dtype)
        return cast.get(key, t)

    return {name: one(t) for name, t in tensors.items()}


class Weights:
    """The trainer's weights as vLLM should serve them (see the module docstring)."""

    def __init__(self, policy):
        self.policy = policy
        self.merged = MergedLora(policy.model) if policy.lora is not None else None

    @property
    def finetune(self) -> str:
        """What trains: `lora` (what is served is the merge) or `full`."""
        return "full" if self.merged is None else "lora"

    @property
    def sharded(self) -> bool:
        return distributed.is_sharded(self.policy.model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """HF name -> tensor at the served dtype, LoRA merged; a sharded model's entries are its
        shards (DTensor: global shapes, local values)."""
        tensors = self.merged.state_dict() if self.merged is not None else self.policy.model.state_dict()
        return served(tensors, self.policy.precision.served)

    def buckets(self, bucket_bytes: int) -> list[dict[str, torch.Tensor]]:
        """Each tensor once (a tied lm_head is the embedding's; vLLM ties them again), in buckets
        of one dtype of about `bucket_bytes`, from global shapes alone: nothing gathered yet."""
        return distributed.buckets(distinct(self.state_dict()), bucket_bytes)

    def send(self, plan: list[dict[str, torch.Tensor]], consume: Callable[[dict[str, torch.Tensor]], int]) -> int:
        """Every rank: each bucket of `plan` gathered whole in turn, handed to `consume` on rank 0
        (it returns the bytes it moved). Rank 0's total, 0 on the others."""
        return distributed.gather_to_main(plan, consume)
