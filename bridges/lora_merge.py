"""finetune=lora over sync=reload, legacy or broadcast: vLLM serves W + (alpha/r) B A as plain weights.

TRL's way with LoRA: the adapter is merged into the base weights and the full model goes the
sync's way (bridges/weights.py gives every pushing bridge the merged tensors), so vLLM runs
without `--enable-lora` and generates at base-model speed. Measured on CPU (tiny model,
`python -m experiments.sync_generate`), a served adapter made each step's generation 3.5-18x
slower, which costs far more than writing the full weights. The trainer's model is never merged
in place (merging and unmerging in float drifts W): the merged tensors are computed beside it.
The probe therefore compares vLLM with the trainer's adapter-enabled logprobs; the KL reference
stays the base model with the adapter disabled (Policy.reference_context).
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer


class MergedLora:
    """The base model's state dict under HF names with every LoRA layer's weight replaced by
    W + sum over active adapters of (alpha/r) B A, what PEFT's `merge_and_unload` would write.
    Merged tensors live in buffers kept across syncs, one `addmm_` per layer: fresh tensors each
    sync (PEFT's `get_delta_weight`, then W + delta) took 207-977 ms against 115-174 ms at 28M
    parameters on this shared CPU, with bit-identical results. Tensors without an adapter are the
    trainer's own, not copied."""

    def __init__(self, peft_model):
        self.base = peft_model.get_base_model()
        self.layers = {f"{name}.weight": module for name, module in self.base.named_modules()
                       if isinstance(module, LoraLayer)}
        self.buffers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        merged = {}
        for key, tensor in self.base.state_dict().items():
            if ".lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            merged[key] = self.merge(key, tensor) if key in self.layers else tensor
        return merged

    def merge(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        layer = self.layers[key]
        out = self.buffers.setdefault(key, torch.empty_like(weight))
        out.copy_(weight)
        for adapter in layer.active_adapters:
            b, a = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
            if layer.fan_in_fan_out:  # Conv1D layers (GPT-2) store W transposed
                b, a = a.T, b.T
            out.addmm_(b.to(out.dtype), a.to(out.dtype), alpha=layer.scaling[adapter])
        return out


def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """One-off merge (bridges/weights.py keeps its MergedLora and its buffers across syncs)."""
    return MergedLora(peft_model).state_dict()
