"""mode=reload: save safetensors, then vLLM reloads them in place (no restart).

The safetensors live in /dev/shm when vLLM runs on this machine and are rewritten in place after
the first save (bridges/safetensors_mirror.py): a sync copies bytes instead of serialising files.

`POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": dir}}` makes every
vLLM worker re-run its weight loader on the directory; the prefix cache is reset afterwards
because cached KV blocks were computed by the old weights. On CPU, our worker extension then
re-packs the tied lm_head, which vLLM's reload leaves stale (bridges/vllm_worker.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

import torch

from bridges.base import VerifiedBridge, dir_bytes
from bridges.safetensors_mirror import SafetensorsMirror
from bridges.shared_memory import SHM, owned_dir
from serving.server import is_loopback


class ReloadBridge(VerifiedBridge):
    mode = "reload"
    mirror = None  # the weights_dir() files, rewritten in place after the first full save

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights vLLM serves, under the HF checkpoint's names (LoRA merged: lora_merge.py)."""
        return self.policy.model.state_dict()

    def weights_dir(self) -> Path:
        """Where vLLM reads the pushed weights: /dev/shm when it runs on this machine (rewriting a
        file-backed mmap in place waits on disk writeback: measured slower than a fresh save),
        else `<run_dir>/sync_weights`, which a server elsewhere must see on a shared filesystem."""
        host = urlparse(self.server.base_url).hostname or ""
        if SHM.is_dir() and is_loopback(host):
            return owned_dir("grpo-sync")
        return self.run_dir / "sync_weights"

    def push(self, step: int) -> int:
        if self.mirror is None:
            self.mirror = SafetensorsMirror(self.weights_dir())
        self.mirror.write(self.policy.base_model, self.state_dict())
        out = self.mirror.out
        self.server.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(out)}})
        self.server.post("/collective_rpc", {"method": "refresh_cpu_weights"})
        self.server.post("/reset_prefix_cache")
        return dir_bytes(out)

    def close(self) -> None:
        if self.mirror is not None:
            self.mirror.close()
            if self.mirror.out.parent == SHM:
                shutil.rmtree(self.mirror.out, ignore_errors=True)
            self.mirror = None
