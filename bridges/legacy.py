"""sync=legacy: write the full model (LoRA merged) and restart vLLM on it (Atropos' simplest mode).

Slow (a vLLM start per sync: tens of seconds on CPU), so `sync.sync_every` is usually > 1; it is
the baseline the other bridges are measured against. vLLM always serves `<run_dir>/served/`,
rewritten in place before each restart like the reload bridge's files (only the changed tensors'
bytes): the model path is part of vLLM's compile-cache key, so one fixed path lets every restart
reuse the first start's compiled graphs, where a new directory per sync recompiled each time.
It lives apart from the resume checkpoints (`checkpoints/`, written by runtime/checkpoint.py), so
neither side deletes or replaces the other's files.
"""

from __future__ import annotations

from pathlib import Path

from bridges.base import Capabilities
from bridges.reload import ReloadBridge
from runtime import distributed


class LegacyBridge(ReloadBridge):
    sync_name = "legacy"
    capabilities = Capabilities(
        async_rollouts="every sync restarts the vLLM server, which would kill the rollouts in flight")

    def weights_dir(self) -> Path:
        return self.run_dir / "served"

    def push(self, step: int) -> int:
        """Rank 0 stops vLLM (it must not start from half-written files), writes, restarts; with
        several trainer processes every rank gathers a sharded model along."""
        if distributed.is_main():
            self.server.stop()
        written = self.write_weights(self.weights_dir())
        if self.mirror is None:
            return 0
        if not self.mirror.in_place:
            self.policy.tokenizer.save_pretrained(self.mirror.out)
        self.server.restart(model=str(self.mirror.out))
        return written
