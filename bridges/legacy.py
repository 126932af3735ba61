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


class LegacyBridge(VerifiedBridge):
    mode = "legacy"

    def push(self, step: int) -> int:
        out = self.run_dir / "served" / f"step-{step:06d}"
        self.policy.model.save_pretrained(out, safe_serialization=True)
        self.policy.tokenizer.save_pretrained(out)
        self.server.restart(model=str(out))
        # The previous copy is no longer served; keep disk use at one model.
        for old in out.parent.glob("step-*"):
            if old != out:
                shutil.rmtree(old, ignore_errors=True)
        return dir_bytes(out)
