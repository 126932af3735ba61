"""HF <-> vLLM parameter names: which HF tensors vLLM fuses, and the views that undo it.

vLLM's model classes fuse q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (stacked along
dim 0) and pad the vocabulary rows of the embedding and lm_head to a multiple of 64. A bridge
that works on vLLM's own tensors (sync=shared) needs the inverse: each HF parameter as a view of
the served tensor. Bridges that send HF names (reload, broadcast) need none of this: vLLM's
`load_weights` maps HF names itself.
"""

from __future__ import annotations

import torch

# vLLM fuses these HF projections into one tensor, stacked along dim 0 in this order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
NAME_MAPS = {"Qwen2ForCausalLM": FUSED, "LlamaForCausalLM": FUSED}
# vLLM pads the vocabulary rows of these to a multiple of 64; the trainer sees the real rows.
VOCAB_PADDED = ("embed_tokens", "lm_head")


class NameMapError(RuntimeError):
    """vLLM's parameters do not map onto the HF model (raised at start)."""


def name_map(config) -> dict[str, tuple[str, ...]]:
    """The fused-name map of `config`'s architecture."""
    arch = (config.architectures or ["?"])[0]
    if arch not in NAME_MAPS:
        raise NameMapError(f"sync=shared has no vLLM<->HF name map for architecture {arch!r}; "
                           f"supported: {sorted(NAME_MAPS)} (add one to bridges/names.py NAME_MAPS)")
    return NAME_MAPS[arch]


def hf_views(served: dict[str, torch.Tensor], hf_shapes: dict[str, torch.Size],
             fused: dict[str, tuple[str, ...]]) -> dict[str, torch.Tensor]:
    """HF parameter name -> view of vLLM's tensor, checked to cover every HF parameter exactly."""
    views = {}
    for name, tensor in served.items():
        prefix, _, leaf = name.rpartition(".")
        parent, _, module = prefix.rpartition(".")
        if module in fused:
            parts = [f"{parent}.{part}.{leaf}" for part in fused[module]]
            rows = [hf_shapes[p][0] if p in hf_shapes else 0 for p in parts]
            if sum(rows) != tensor.shape[0]:
                raise NameMapError(f"{name}: vLLM has {tensor.shape[0]} rows, the HF parts "
                                   f"{fused[module]} add up to {sum(rows)}")
            views.update(zip(parts, tensor.split(rows)))
        elif module in VOCAB_PADDED and name in hf_shapes:
            views[name] = tensor.narrow(0, 0, hf_shapes[name][0])
        else:
            views[name] = tensor
    missing = sorted(set(hf_shapes) - set(views))
    unknown = sorted(set(views) - set(hf_shapes))
    wrong = [f"{n}: HF {tuple(hf_shapes[n])} vs vLLM {tuple(v.shape)}" for n, v in views.items()
             if n in hf_shapes and v.shape != hf_shapes[n]]
    if missing or unknown or wrong:
        raise NameMapError(f"vLLM's parameters do not map onto the HF model: missing {missing[:5]}, "
                           f"unknown {unknown[:5]}, shape mismatch {wrong[:5]}")
    return views
