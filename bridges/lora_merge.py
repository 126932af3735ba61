"""mode=lora (merge, the default sync): vLLM serves W + (alpha/r) B A as plain weights.

TRL's way with LoRA: the adapter is merged into the base weights and the full model goes through
the reload path (ReloadBridge: safetensors -> `reload_weights` -> `/reset_prefix_cache`), so
vLLM runs without `--enable-lora` and generates at base-model speed. Measured on CPU, a served
adapter made every step's generation ~10x slower, which costs far more than writing the full
weights (experiments/sync_generate.py). The trainer's model is never merged in place (merging and
unmerging in float drifts W): the merged tensors are computed beside it. The probe therefore
compares vLLM with the trainer's adapter-enabled logprobs; the KL reference stays the base model
with the adapter disabled (Policy.reference_context).
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from bridges.reload import ReloadBridge


@torch.no_grad()
def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The base model's state dict under HF names, each LoRA layer's weight replaced by
    W + sum over active adapters of PEFT's own delta (what `merge_and_unload` would write);
    untouched tensors are the trainer's own (not copied)."""
    base = peft_model.get_base_model()
    deltas = {f"{name}.weight": sum(module.get_delta_weight(a) for a in module.active_adapters)
              for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    merged = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        merged[key] = tensor + deltas[key] if key in deltas else tensor
    return merged


class MergedLoraBridge(ReloadBridge):
    mode = "lora_merge"

    def state_dict(self) -> dict[str, torch.Tensor]:
        return merged_state_dict(self.policy.model)
