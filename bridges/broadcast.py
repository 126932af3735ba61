"""sync=broadcast: vLLM runs as its own server (own devices, TP/DP, possibly another host); the
trainer pushes new weights over a collective after each step (TRL's `vllm_mode="server"`,
ms-swift's external rollout); with finetune=lora the merged weights (bridges/weights.py).

Two mechanisms, one module each, picked by `hardware.collective` (`broadcast_bridge`):
- `broadcast_gloo.GlooBroadcastBridge`: a gloo group with our worker extension; works wherever
  vLLM runs (CPU; also a GPU that the trainer shares, through host memory).
- `broadcast_nccl.NcclBroadcastBridge`: vLLM's own NCCL weight-transfer engine, GPU to GPU;
  the trainer's GPU must not be one of vLLM's.

This base holds what both share: where the group meets, the time limit of every collective, the
number of vLLM workers, joining again after vLLM restarted (its workers left the group), and the
prefix-cache reset that keeps KV blocks of the old weights from being reused: vLLM does not reset
it after a weight update (VLLMServer.reset_prefix_cache, as every bridge resets it).
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from bridges.base import VerifiedBridge
from runtime import distributed
from serving.server import free_port


COLLECTIVES = {"gloo": "bridges.broadcast_gloo.GlooBroadcastBridge",
               "nccl": "bridges.broadcast_nccl.NcclBroadcastBridge"}


def broadcast_bridge(collective: str = "gloo", **common) -> "BroadcastBridge":
    """conf/sync/broadcast.yaml's `_target_`: the bridge of `collective` (hardware.collective)."""
    if collective not in COLLECTIVES:
        raise ValueError(f"hardware.collective={collective!r}: must be one of {sorted(COLLECTIVES)}")
    module, _, name = COLLECTIVES[collective].rpartition(".")
    return getattr(importlib.import_module(module), name)(**common)


class BroadcastBridge(VerifiedBridge):
    sync_name = "broadcast"

    def __init__(self, group_host: str = "127.0.0.1", group_port: Optional[int] = None, bucket_mb: float = 64.0,
                 timeout_s: float = 60.0, **probe):
        super().__init__(**probe)
        self.group_host = group_host
        self.group_port = group_port  # None: a free port, new at each join
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.timeout_s = timeout_s
        self.port: Optional[int] = None
        self.joined_server: Optional[tuple] = None

    def where(self) -> str:
        return f"weight group {self.group_host}:{self.port} (vLLM at {self.server.base_url})"

    def server_identity(self) -> tuple:
        """Changes when our server restarts (new process, new port)."""
        return self.server.base_url, getattr(self.server.proc, "pid", None)

    def setup(self, policy, server, client, run_dir) -> None:
        super().setup(policy, server, client, run_dir)
        if distributed.is_main():  # rank 0 alone is in the group with vLLM's workers
            self.connect()

    def connect(self) -> None:
        """Form the trainer (rank 0) + vLLM workers (ranks 1..) group, leaving any earlier one."""
        self.disconnect()
        self.port = self.group_port or free_port(self.group_host)
        workers = int(self.server.get("/get_world_size")["world_size"])  # TP * PP * DP
        self.join(1 + workers)
        self.joined_server = self.server_identity()

    def push(self, step: int) -> int:
        """Rank 0 sends; with several trainer processes (a sharded model) the other ranks take
        part in gathering each bucket as rank 0 reaches it (Weights.send)."""
        plan = self.weights.buckets(self.bucket_bytes)
        if not distributed.is_main():
            return self.weights.send(plan, None)
        if self.joined_server != self.server_identity():
            self.connect()  # vLLM restarted: its new workers are in no group
        sent = self.send(step, plan)
        self.server.reset_prefix_cache()
        return sent

    def close(self) -> None:
        self.disconnect()

    def join(self, world_size: int) -> None:
        """Form the group of `world_size` ranks at `self.group_host:self.port`."""
        raise NotImplementedError

    def send(self, step: int, plan: list[dict[str, torch.Tensor]]) -> int:
        """Send every bucket of `plan` (HF name -> tensor, shards gathered as they are reached:
        `self.weights.send`) to all workers; return the bytes sent."""
        raise NotImplementedError

    def disconnect(self) -> None:
        """Leave the group (nothing to do when none was formed)."""
        raise NotImplementedError
