"""mode=broadcast: vLLM runs as its own server (own devices, TP/DP, possibly another host); the
trainer pushes new weights over a collective after each step (TRL's `vllm_mode="server"`,
ms-swift's external rollout).

Two mechanisms, one module each, picked by `_target_` (`hardware.broadcast_bridge`):
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

from typing import Optional

import torch

from bridges.base import VerifiedBridge
from runtime import distributed
from serving.server import free_port


class BroadcastBridge(VerifiedBridge):
    mode = "broadcast"

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
        part in gathering each tensor as rank 0 reaches it (`full_tensor()` is a collective)."""
        named = list(self.served({n: p.detach() for n, p in self.policy.model.named_parameters()}).items())
        if not distributed.is_main():
            self.gather_along(named)
            return 0
        if self.joined_server != self.server_identity():
            self.connect()  # vLLM restarted: its new workers are in no group
        sent = self.send(step, named)
        self.server.reset_prefix_cache()
        return sent

    def close(self) -> None:
        self.disconnect()

    def join(self, world_size: int) -> None:
        """Form the group of `world_size` ranks at `self.group_host:self.port`."""
        raise NotImplementedError

    def send(self, step: int, named: list[tuple[str, torch.Tensor]]) -> int:
        """Send every (HF name, tensor) to all workers; return the bytes sent. A tensor may be a
        shard (DTensor): it is gathered when its bucket is sent, never the whole model at once."""
        raise NotImplementedError

    def gather_along(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """On a rank other than 0: take part in each gather of `send`, in its order."""
        raise NotImplementedError

    def disconnect(self) -> None:
        """Leave the group (nothing to do when none was formed)."""
        raise NotImplementedError
