"""mode=reload: save safetensors, then vLLM reloads them in place (no restart).

`POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": dir}}` makes every
vLLM worker re-run its weight loader on the directory; the prefix cache is reset afterwards
because cached KV blocks were computed by the old weights. On CPU, our worker extension then
re-packs the tied lm_head, which vLLM's reload leaves stale (bridges/vllm_worker.py).
"""

from __future__ import annotations

from bridges.base import VerifiedBridge, dir_bytes


class ReloadBridge(VerifiedBridge):
    mode = "reload"

    def push(self, step: int) -> int:
        out = self.run_dir / "sync_weights"
        self.policy.model.save_pretrained(out, safe_serialization=True)
        self.server.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(out)}})
        self.server.post("/collective_rpc", {"method": "refresh_cpu_weights"})
        self.server.post("/reset_prefix_cache")
        return dir_bytes(out)
