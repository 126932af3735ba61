"""sync=adapter (finetune=lora): hot-swap the trained PEFT adapter into the running vLLM.

The other LoRA syncs, and mode=lora's default (sync=reload), merge the adapter and push the
full weights (bridges/lora_merge.py): an adapter moves ~1000x fewer bytes, but vLLM then
computes the LoRA path on every generated token, which on CPU made each step's generation
several times slower.

Each sync saves the adapter (a few MB even for large models) and calls
`POST /v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace": true}`: the first sync
loads it, later ones replace it in place (server: `--enable-lora --max-lora-rank`,
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`). Rollouts name the adapter as their model
(`served_model`, which the run gives its client); so vLLM has it from the start, the first
sync runs at start (the adapter is then the identity: PEFT initialises B = 0).
"""

from __future__ import annotations

import shutil
from typing import Optional

from bridges.base import Capabilities, VerifiedBridge, dir_bytes
from runtime import distributed


class LoraBridge(VerifiedBridge):
    """Any number of trainer processes: the adapter is replicated on every rank, rank 0 pushes it."""

    sync_name = "adapter"
    capabilities = Capabilities(
        full="full fine-tuning has no adapter to hot-swap (use sync=reload, broadcast, legacy or shared)")

    def __init__(self, adapter_name: str = "policy-lora", keep: int = 2, max_lora_rank: int = 64, **probe):
        super().__init__(**probe)
        self.adapter_name = adapter_name
        self.served_model = adapter_name  # what rollouts ask vLLM for
        self.keep = keep  # adapter dirs kept on disk (vLLM may still read the previous one)
        self.max_lora_rank = max_lora_rank  # finetune.lora.r above it is refused when the model is wrapped

    def server_args(self) -> list[str]:
        return ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", "1"]

    def server_env(self) -> dict[str, str]:
        return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}  # /v1/load_lora_adapter at run time

    def initial_sync(self, resumed_step: Optional[int]) -> None:
        """Always: rollouts name the adapter, so vLLM must hold it before the first request."""
        self.sync(resumed_step or 0)

    def push(self, step: int) -> int:
        if not distributed.is_main():
            return 0
        out = self.run_dir / "adapters" / f"step-{step:06d}"
        self.policy.model.save_pretrained(out)
        nbytes = dir_bytes(out)
        self.server.post("/v1/load_lora_adapter",
                         {"lora_name": self.adapter_name, "lora_path": str(out), "load_inplace": True},
                         self.server.deadline("sync_s", nbytes))
        for old in sorted(out.parent.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return nbytes
