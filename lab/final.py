"""The model a run leaves behind: `<run_dir>/final/`, written after the last step of every run.

A directory that `AutoModelForCausalLM.from_pretrained` and a vLLM server load as they are: the
model and its tokenizer. With LoRA, final/ holds the PEFT adapter and tokenizer (`from_pretrained`
applies it to the base model its adapter_config.json names; vLLM serves it with --enable-lora),
and with `finetune.lora.merge_on_save` also `final/merged/`: W + (alpha/r) B A as plain weights, the
same tensors the merge sync pushes to vLLM (bridges/lora_merge.py), for any server or tool.
In sync=shared the trainer's parameters are views of vLLM's tensors (fused q/k/v, padded
vocabulary); `save_pretrained` writes each view's own values, so final/ is an ordinary model.
Written like a checkpoint: into a temp dir, fsynced, then renamed (runtime/checkpoint.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from bridges.lora_merge import merged_state_dict
from bridges.safetensors_mirror import save_gathered
from runtime import distributed
from runtime.checkpoint import atomic_dir
from grpo.policy import Policy


def final_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "final"


def save(policy: Policy, run_dir: Path, merge_lora: bool = True) -> Path:
    """Write the trained model into `<run_dir>/final/` atomically; returns that directory."""
    out = final_dir(run_dir)
    if distributed.is_sharded(policy.model):
        return _save_sharded(policy, out)
    if not distributed.is_main():  # a replicated model (LoRA): rank 0's copy is every rank's
        return out
    with atomic_dir(out) as tmp:
        policy.save(tmp)
        if policy.lora is not None and merge_lora:
            policy.base_model.save_pretrained(tmp / "merged", state_dict=merged_state_dict(policy.model),
                                              safe_serialization=True)
            policy.tokenizer.save_pretrained(tmp / "merged")
    return out


def _save_sharded(policy: Policy, out: Path) -> Path:
    """A model sharded over trainer processes, gathered bucket by bucket (every rank takes part),
    written by rank 0 as one safetensors file: no rank holds the whole model."""
    with atomic_dir(out) if distributed.is_main() else nullcontext() as tmp:
        save_gathered(tmp, policy.base_model.config, policy.model.state_dict())
        if tmp is not None:
            policy.tokenizer.save_pretrained(tmp)
    distributed.barrier()  # final/ is in place before any rank returns
    return out
