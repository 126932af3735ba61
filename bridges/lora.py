"""mode=lora mode/lora_sync=adapter: hot-swap the trained PEFT adapter into the running vLLM.

The other LoRA sync, and mode=lora's default, merges the adapter and reloads full weights
(bridges/lora_merge.py): an adapter moves ~1000x fewer bytes, but vLLM then computes the LoRA
path on every generated token, which on CPU made each step's generation several times slower.

Each sync saves the adapter (a few MB even for large models) and calls
`POST /v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace": true}`: the first sync
loads it, later ones replace it in place (server: `--enable-lora --max-lora-rank`,
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`). Rollouts then name the adapter as their model.
Before the first sync the adapter is the identity (PEFT initialises B = 0), so the base model
serves the same distribution.
"""

from __future__ import annotations

import shutil

from bridges.base import VerifiedBridge, dir_bytes
from runtime import distributed


class LoraBridge(VerifiedBridge):
    mode = "lora"

    def __init__(self, adapter_name: str = "policy-lora", keep: int = 2, max_lora_rank: int = 64, **probe):
        super().__init__(**probe)
        self.adapter_name = adapter_name
        self.keep = keep  # adapter dirs kept on disk (vLLM may still read the previous one)
        self.max_lora_rank = max_lora_rank  # mode.lora.r above it is refused when the model is wrapped

    def server_args(self) -> list[str]:
        return ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", "1"]

    def server_env(self) -> dict[str, str]:
        return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}  # /v1/load_lora_adapter at run time

    def check_trainer_procs(self, n: int) -> None:
        """Any number: the adapter is replicated on every rank, rank 0 pushes it."""

    def push(self, step: int) -> int:
        if not distributed.is_main():
            return 0
        out = self.run_dir / "adapters" / f"step-{step:06d}"
        self.policy.model.save_pretrained(out)
        nbytes = dir_bytes(out)
        self.server.post("/v1/load_lora_adapter",
                         {"lora_name": self.adapter_name, "lora_path": str(out), "load_inplace": True},
                         self.server.deadline("sync_s", nbytes))
        self.client.model = self.adapter_name
        for old in sorted(out.parent.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return nbytes
