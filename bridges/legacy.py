"""mode=legacy: save a full model and restart vLLM on it (Atropos' simplest mode).

Slow (a vLLM start per sync: tens of seconds on CPU), so `mode.sync_every` is usually > 1; it is
the baseline the other bridges are measured against. The served copies live in
`<run_dir>/served/step-XXXXXX/`, apart from the resume checkpoints (`checkpoints/`, written by
grpo/checkpoint.py), so neither side deletes or replaces the other's files; only the copy vLLM
runs from is kept.
"""

from __future__ import annotations

import shutil

from bridges.base import VerifiedBridge, dir_bytes
from bridges.safetensors_mirror import save_gathered
from grpo import distributed


class LegacyBridge(VerifiedBridge):
    mode = "legacy"

    def check_trainer_procs(self, n: int) -> None:
        """Any number: a sharded model is gathered bucket by bucket, rank 0 saves and restarts."""

    def push(self, step: int) -> int:
        out = self.run_dir / "served" / f"step-{step:06d}"
        if distributed.is_sharded(self.policy.model):
            save_gathered(out if distributed.is_main() else None, self.policy.model.config,
                          self.served(self.policy.model.state_dict()))
        elif distributed.is_main():
            self.policy.model.save_pretrained(out, state_dict=self.served(self.policy.model.state_dict()),
                                              safe_serialization=True)
        if not distributed.is_main():
            return 0
        self.policy.tokenizer.save_pretrained(out)
        self.server.restart(model=str(out))
        # The previous copy is no longer served; keep disk use at one model.
        for old in out.parent.glob("step-*"):
            if old != out:
                shutil.rmtree(old, ignore_errors=True)
        return dir_bytes(out)
