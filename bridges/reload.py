"""sync=reload: save safetensors, then vLLM reloads them in place (no restart).

The safetensors live in /dev/shm when vLLM runs on this machine and are rewritten in place after
the first save (bridges/safetensors_mirror.py): a sync copies the changed tensors' bytes instead
of serialising files, and its `bytes` are those copied (a tied embedding once).

`POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": dir}}` makes every
vLLM worker re-run its weight loader on the directory; the prefix cache is reset afterwards
because cached KV blocks were computed by the old weights (a reset vLLM refuses stops the sync:
VLLMServer.reset_prefix_cache). On CPU, our worker extension then
re-packs the tied lm_head, which vLLM's reload leaves stale (bridges/vllm_worker.py).
What is written is `Weights` (bridges/weights.py): with finetune=lora, the merged adapter.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

from bridges.base import VerifiedBridge, dir_bytes
from bridges.safetensors_mirror import SafetensorsMirror, write_sharded
from bridges.shared_memory import SHM, owned_dir
from runtime import distributed
from serving.server import is_loopback


class ReloadBridge(VerifiedBridge):
    """Any finetune (LoRA merged), any number of trainer processes (a sharded model is gathered
    bucket by bucket, rank 0 writes), async rollouts, any devices: capabilities' defaults."""

    sync_name = "reload"
    mirror = None  # the weights_dir() files, rewritten in place after the first full save (rank 0's)

    def weights_dir(self) -> Path:
        """Where vLLM reads the pushed weights: /dev/shm when it runs on this machine (rewriting a
        file-backed mmap in place waits on disk writeback: measured slower than a fresh save),
        else `<run_dir>/sync_weights`, which a server elsewhere must see on a shared filesystem."""
        host = urlparse(self.server.base_url).hostname or ""
        if SHM.is_dir() and is_loopback(host):
            return owned_dir("grpo-sync")
        return self.run_dir / "sync_weights"

    def push(self, step: int) -> int:
        """Rank 0 writes and posts; with several trainer processes every rank takes part in
        gathering a sharded model, the others return 0 bytes."""
        written = self.write_weights(self.weights_dir())
        if self.mirror is None:
            return 0
        out = self.mirror.out
        deadline = self.server.deadline("sync_s", dir_bytes(out))  # vLLM reads the whole checkpoint
        self.server.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(out)}}, deadline)
        self.server.post("/collective_rpc", {"method": "refresh_cpu_weights"}, deadline)
        self.server.reset_prefix_cache()
        return written

    def write_weights(self, out: Path) -> int:
        """The served weights into `out` as an HF checkpoint, through rank 0's mirror (every rank
        gathers a sharded model along); the bytes written on rank 0, 0 on the others."""
        if self.mirror is None and distributed.is_main():
            self.mirror = SafetensorsMirror(out)
        if self.weights.sharded:
            return write_sharded(self.mirror, self.policy.base_model.config, self.weights.state_dict())
        return self.mirror.write(self.policy.base_model, self.weights.state_dict()) if self.mirror is not None else 0

    def close(self) -> None:
        if self.mirror is not None:
            self.mirror.close()
            if self.mirror.out.parent == SHM:
                shutil.rmtree(self.mirror.out, ignore_errors=True)
            self.mirror = None
