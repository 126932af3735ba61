"""The Bridge protocol (trainer weights -> vLLM) and the verification every sync goes through.

`Bridge` declares everything train.py asks of a mode, with the defaults most modes want, so
building a run never probes a bridge for what it can do.

A sync is only done when vLLM provably serves the weights just pushed: the logprobs vLLM gives a
fixed probe sequence must match the trainer's to `probe_tolerance`. A mismatch retries the push
once, then stops the run with an error, so a sync never fails silently.
Its record also says how far vLLM's own probe logprobs moved since the previous verification
(`extra.served_moved`): a sync that left vLLM serving what it served before shows 0 there.

The tolerance follows the precision vLLM serves unless set (`grpo.precision.Precision.probe_tolerance`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from bridges.safetensors_mirror import storage_key
from serving.server import VLLMServer
from runtime import distributed
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


class Bridge:
    """How the trainer's weights reach vLLM, in the order train.py calls it: `server_args` and
    `server_env` (before vLLM starts), `build_model`, `setup`, `initial_sync`, then per step
    `step_context` around optimizer.step() and `sync`, and `close` at the end."""

    mode = "base"
    # The trainer trains vLLM's own tensors (no copy of its own): its weights are the served
    # dtype, so mixed precision (fp32 masters, bf16 served) cannot be kept.
    shares_weights = False

    def server_args(self) -> list[str]:
        """vLLM flags this mode needs (hardware.server_args and server.extra_args add theirs)."""
        return []

    def server_env(self) -> dict[str, str]:
        """Environment variables the vLLM server needs for this mode."""
        return {}

    def check_trainer_procs(self, n: int) -> None:
        """At start: refuse `n` trainer processes (torchrun) if this mode cannot serve them."""
        if n > 1:
            raise ValueError(f"mode={self.mode} runs with one trainer process, not {n}; mode=reload, lora, legacy "
                             "and broadcast run under torchrun")

    def build_model(self, path: str, dtype: str, device: str, server: VLLMServer) -> Optional[torch.nn.Module]:
        """The trainer's model if this mode must build it (mode=shared: views of vLLM's weights, so
        it starts `server` first); None: the trainer loads it from `path`."""
        return None

    def setup(self, policy: Policy, server: VLLMServer, client: VLLMClient, run_dir: Path) -> None:
        self.policy, self.server, self.client = policy, server, client
        self.run_dir = Path(run_dir)

    def initial_sync(self, resumed_step: Optional[int]) -> None:
        """At start vLLM serves the base model: a resumed run pushes its checkpoint's weights."""
        if resumed_step is not None:
            self.sync(resumed_step)

    def step_context(self) -> contextlib.AbstractContextManager:
        """Wraps optimizer.step(): bridges whose vLLM reads the trainer's memory pause it here."""
        return contextlib.nullcontext()

    def sync(self, step: int) -> SyncStats:
        raise NotImplementedError

    def close(self) -> None:
        pass


class VerifiedBridge(Bridge):
    """Base of the bridges: subclasses implement `push`; `sync` times and verifies it."""

    def __init__(self, probe_prompt: str = "What is 6 times 7?", probe_completion: str = "6 times 7 is 42.",
                 probe_tolerance: Optional[float] = None):
        self.probe_prompt = probe_prompt
        self.probe_completion = probe_completion
        self.probe_tolerance = probe_tolerance  # None: the policy's precision's, at setup
        self.served_probe: Optional[list[float]] = None  # vLLM's probe logprobs at the last verification (rank 0)

    def setup(self, policy: Policy, server: VLLMServer, client: VLLMClient, run_dir: Path) -> None:
        super().setup(policy, server, client, run_dir)
        if self.probe_tolerance is None:
            self.probe_tolerance = policy.precision.probe_tolerance
        completion = policy.tokenizer(self.probe_completion, add_special_tokens=False).input_ids
        self.probe_ids = policy.encode_chat([{"role": "user", "content": self.probe_prompt}]) + completion

    def served(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` as vLLM holds them: cast to the served dtype (bf16 served from fp32 master
        weights: half the bytes to move, and vLLM has nothing to convert). Uncast: the same tensors.
        Tensors that alias each other (tied embeddings) stay one tensor after the cast."""
        dtype, cast = self.policy.precision.served, {}

        def one(t: torch.Tensor) -> torch.Tensor:
            key = storage_key(t)
            if t.is_floating_point() and key not in cast:
                cast[key] = t.to(dtype)
            return cast.get(key, t)

        return {name: one(t) for name, t in tensors.items()}

    def push(self, step: int) -> int:
        """Move the trainer's weights into vLLM; return bytes written or moved."""
        raise NotImplementedError

    def probe_diff(self) -> float:
        """Rank 0's comparison, on every rank (a sharded model's forward is a collective, and all
        ranks must take the same retry-or-stop branch)."""
        mine = self.policy.probe_logprobs(self.probe_ids)
        distributed.reshard(self.policy.model)  # a no-grad forward: see runtime/distributed.py
        diff = None
        if distributed.is_main():
            self.served_probe = self.client.prompt_logprobs(self.probe_ids)
            diff = max(abs(a - b) for a, b in zip(self.served_probe, mine))
        return distributed.broadcast_object(diff)

    def initial_sync(self, resumed_step: Optional[int]) -> None:
        # A resumed run always pushes: a LoRA adapter close to identity would pass the probe unloaded.
        if resumed_step is not None:
            self.sync(resumed_step)
        else:
            self.ensure_synced()

    def ensure_synced(self) -> None:
        """At start: an attached server may still serve an earlier run's weights."""
        if self.probe_diff() > self.probe_tolerance:
            self.sync(0)

    def sync(self, step: int) -> SyncStats:
        before = self.served_probe
        for attempt in (1, 2):
            t0 = time.perf_counter()
            nbytes = self.push(step)
            t1 = time.perf_counter()
            diff = self.probe_diff()
            t2 = time.perf_counter()
            if diff <= self.probe_tolerance:
                extra = {"attempts": attempt}
                if before is not None and self.served_probe is not None:
                    extra["served_moved"] = max(abs(a - b) for a, b in zip(self.served_probe, before))
                return SyncStats(step, self.mode, (t1 - t0) * 1e3, nbytes, diff, (t2 - t1) * 1e3, extra)
        raise WeightSyncError(
            f"{self.mode} sync at step {step}: vLLM at {self.server.base_url} still serves other weights "
            f"after a retry (probe max |dlogprob| = {diff:.3g} > probe_tolerance={self.probe_tolerance})"
        )


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
