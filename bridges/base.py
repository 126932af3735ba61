"""The Bridge protocol (trainer weights -> vLLM) and the verification every sync goes through.

`Bridge` declares everything building a run asks of a sync, with the defaults most syncs want,
and what it can serve in one place, its class's `capabilities`: lab/compose.py refuses a
(finetune x sync x hardware) it cannot serve at start, with the sentence it gives there.

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

from bridges.weights import Weights
from serving.server import VLLMServer
from runtime import distributed
from grpo.policy import Policy
from serving.client import VLLMClient


class WeightSyncError(RuntimeError):
    """vLLM does not serve the trainer's weights after a sync (and its retry)."""


@dataclass(frozen=True)
class Capabilities:
    """What a bridge can serve, declared on its class. Each field is None where it can, else the
    sentence saying why it cannot, which the refusal at start quotes (lab/compose.py)."""

    full: Optional[str] = None  # finetune=full: every weight trains
    lora: Optional[str] = None  # finetune=lora: adapters over a frozen base
    trainer_procs: Optional[str] = None  # several trainer processes (torchrun, FSDP2 shards)
    async_rollouts: Optional[str] = None  # train.max_staleness > 0: requests run while the trainer updates
    same_device: Optional[str] = None  # vLLM on the trainer's device (its GPU, or the CPU)
    separate_devices: Optional[str] = None  # vLLM on GPUs of its own, or another machine
    vllm_parallel: Optional[str] = None  # vLLM with TP or DP > 1
    # The trainer's model is built on the running server's weights (`build_model`): the server
    # starts before the model, and the trainer's weights are vLLM's tensors at the served dtype.
    model_from_server: bool = False


@dataclass
class SyncStats:
    step: int
    finetune: str  # what trains: full | lora
    sync: str  # how it reached vLLM: reload | legacy | adapter | shared | broadcast
    ms: float  # wall time of the push (save/transfer/reload), verification excluded
    bytes: int  # bytes written or moved
    probe_max_diff: float  # max |logprob_vllm - logprob_trainer| over the probe tokens
    verify_ms: float
    pause_ms: float = 0.0  # generation paused around optimizer.step() for it (sync=shared)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Bridge:
    """How the trainer's weights reach vLLM, in the order a run calls it: `server_args` and
    `server_env` (before vLLM starts), `build_model`, `setup`, `initial_sync`, then per step
    `step_context` around optimizer.step() and `sync`, and `close` at the end."""

    sync_name = "base"  # its option in conf/sync/
    capabilities = Capabilities()
    # The model name rollouts ask vLLM for; None: model.served_name (the served base weights).
    served_model: Optional[str] = None

    def server_args(self) -> list[str]:
        """vLLM flags this sync needs (hardware.server_args and server.extra_args add theirs)."""
        return []

    def server_env(self) -> dict[str, str]:
        """Environment variables the vLLM server needs for this sync."""
        return {}

    def build_model(self, path: str, dtype: str, device: str, server: VLLMServer) -> Optional[torch.nn.Module]:
        """The trainer's model if this bridge must build it (`capabilities.model_from_server`:
        views of the running server's weights); None: the trainer loads it from `path`."""
        return None

    def setup(self, policy: Policy, server: VLLMServer, client: VLLMClient, run_dir: Path) -> None:
        self.policy, self.server, self.client = policy, server, client
        self.run_dir = Path(run_dir)
        self.weights = Weights(policy)  # what vLLM should serve (LoRA merged), gathered to rank 0

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
                return SyncStats(step, self.weights.finetune, self.sync_name, (t1 - t0) * 1e3, nbytes, diff,
                                 (t2 - t1) * 1e3, extra=extra)
        raise WeightSyncError(
            f"sync={self.sync_name} at step {step}: vLLM at {self.server.base_url} still serves other weights "
            f"after a retry (probe max |dlogprob| = {diff:.3g} > probe_tolerance={self.probe_tolerance})"
        )


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
