"""The Bridge protocol (trainer weights -> vLLM) and the verification every sync goes through.

A sync is only done when vLLM provably serves the weights just pushed: the logprobs vLLM gives a
fixed probe sequence must match the trainer's to `probe_tolerance`. A mismatch retries the push
once, then stops the run with an error, so a sync never fails silently.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from serving.server import VLLMServer
from grpo.policy import Policy
from serving.client import VLLMClient


class WeightSyncError(RuntimeError):
    """vLLM does not serve the trainer's weights after a sync (and its retry)."""


@dataclass
class SyncStats:
    step: int
    mode: str
    ms: float  # wall time of the push (save/transfer/reload), verification excluded
    bytes: int  # bytes written or moved
    probe_max_diff: float  # max |logprob_vllm - logprob_trainer| over the probe tokens
    verify_ms: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Bridge(Protocol):
    def setup(self, policy: Policy, server: VLLMServer, client: VLLMClient, run_dir: Path) -> None: ...
    def sync(self, step: int) -> SyncStats: ...
    def step_context(self) -> contextlib.AbstractContextManager: ...
    def close(self) -> None: ...


class VerifiedBridge:
    """Base of the bridges: subclasses implement `push`; `sync` times and verifies it."""

    mode = "base"

    def __init__(self, probe_prompt: str = "What is 6 times 7?", probe_completion: str = "6 times 7 is 42.",
                 probe_tolerance: float = 1e-3):
        self.probe_prompt = probe_prompt
        self.probe_completion = probe_completion
        self.probe_tolerance = probe_tolerance

    def setup(self, policy: Policy, server: VLLMServer, client: VLLMClient, run_dir: Path) -> None:
        self.policy, self.server, self.client = policy, server, client
        self.run_dir = Path(run_dir)
        completion = policy.tokenizer(self.probe_completion, add_special_tokens=False).input_ids
        self.probe_ids = policy.encode_chat([{"role": "user", "content": self.probe_prompt}]) + completion

    def step_context(self):
        """Wraps optimizer.step(): bridges whose vLLM reads the trainer's memory pause it here."""
        return contextlib.nullcontext()

    def push(self, step: int) -> int:
        """Move the trainer's weights into vLLM; return bytes written or moved."""
        raise NotImplementedError

    def probe_diff(self) -> float:
        served = self.client.prompt_logprobs(self.probe_ids)
        mine = self.policy.probe_logprobs(self.probe_ids)
        return max(abs(a - b) for a, b in zip(served, mine))

    def ensure_synced(self) -> None:
        """At start: an attached server may still serve an earlier run's weights."""
        if self.probe_diff() > self.probe_tolerance:
            self.sync(0)

    def sync(self, step: int) -> SyncStats:
        for attempt in (1, 2):
            t0 = time.perf_counter()
            nbytes = self.push(step)
            t1 = time.perf_counter()
            diff = self.probe_diff()
            t2 = time.perf_counter()
            if diff <= self.probe_tolerance:
                return SyncStats(step, self.mode, (t1 - t0) * 1e3, nbytes, diff, (t2 - t1) * 1e3,
                                 {"attempts": attempt})
        raise WeightSyncError(
            f"{self.mode} sync at step {step}: vLLM at {self.server.base_url} still serves other weights "
            f"after a retry (probe max |dlogprob| = {diff:.3g} > probe_tolerance={self.probe_tolerance})"
        )

    def close(self) -> None:
        pass


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
