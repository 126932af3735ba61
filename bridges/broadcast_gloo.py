"""sync=broadcast over gloo: our worker extension (bridges/vllm_worker.py CollectiveMixin) joins a
gloo group with the trainer (rank 0) and receives flat buckets, one broadcast per bucket.

vLLM has no gloo weight-transfer engine, hence the extension. Bucketing is what makes it fast:
TRL's one HTTP call and one broadcast per tensor is what made its syncs slow; `bucket_mb=0`
sends one tensor per broadcast. Gloo moves host memory, so this also serves a trainer on the GPU
that vLLM uses (NCCL cannot put two ranks on one GPU). Every collective has `timeout_s`, so a
server that goes away mid-sync or a group that cannot form ends in an error naming host and port.
The HTTP call beside each collective has its deadline (`receive`: `server.deadlines.sync_s` by the
bytes moved; `join`: `timeout_s` + 30 s); when the collective fails, that call's own failure is
what is raised: a dead or hung (stopped) vLLM then reaches serving/guard.py, which restarts ours.
"""

from __future__ import annotations

import datetime
import threading

import torch
import torch.distributed as dist

from bridges.base import WeightSyncError
from bridges.broadcast import BroadcastBridge
from serving.server import Deadline, VLLMHungError, VLLMRequestError

GROUP_PREFIX = "grpo-weights"  # the key prefix both sides use in the rendezvous store


def join_request(host: str, port: int, world_size: int, timeout_s: float) -> dict:
    """The /collective_rpc body that makes every worker join (WorkerExtension.join_weight_group)."""
    return {"method": "join_weight_group",
            "kwargs": {"host": host, "port": port, "world_size": world_size, "rank_offset": 1, "timeout_s": timeout_s}}


def receive_request(plan: list[dict[str, torch.Tensor]]) -> dict:
    """The /collective_rpc body announcing `plan` (WorkerExtension.receive_weights): per bucket,
    [HF name, dtype name, shape] of each tensor, in broadcast order."""
    meta = [[[n, str(t.dtype).removeprefix("torch."), list(t.shape)] for n, t in bucket.items()] for bucket in plan]
    return {"method": "receive_weights", "kwargs": {"buckets": meta}}


class GlooBroadcastBridge(BroadcastBridge):
    def __init__(self, **common):
        super().__init__(**common)
        self.group = None
        self.store = None  # the rendezvous (we are its master) lives as long as the group

    def join(self, world_size: int) -> None:
        timeout = datetime.timedelta(seconds=self.timeout_s)
        self.store = dist.TCPStore(self.group_host, self.port, world_size, is_master=True, timeout=timeout,
                                   wait_for_workers=False)
        joined = self._rpc_in_background(join_request(self.group_host, self.port, world_size, self.timeout_s),
                                         Deadline(self.timeout_s + 30, "sync.bridge.timeout_s + 30"))
        try:
            self.group = dist.ProcessGroupGloo(dist.PrefixStore(GROUP_PREFIX, self.store), 0, world_size, timeout)
        except RuntimeError as exc:
            self._raise_request_error(joined, "join")
            raise WeightSyncError(f"could not form the {self.where()} within {self.timeout_s:.0f}s "
                                  f"(sync.bridge.timeout_s): {exc}") from exc
        self._join(joined, "join")

    def send(self, step: int, plan: list[dict[str, torch.Tensor]]) -> int:
        nbytes = sum(t.numel() * t.element_size() for bucket in plan for t in bucket.values())
        pending = self._rpc_in_background(receive_request(plan), self.server.deadline("sync_s", nbytes))
        opts = dist.BroadcastOptions()
        opts.rootRank = 0

        def broadcast(bucket: dict[str, torch.Tensor]) -> int:
            flat = torch.cat([t.reshape(-1) for t in bucket.values()]).cpu()  # a GPU trainer's copy to host
            self.group.broadcast([flat], opts).wait()
            return flat.numel() * flat.element_size()

        try:
            sent = self.weights.send(plan, broadcast)
        except RuntimeError as exc:
            self._raise_request_error(pending, f"sync at step {step}")
            raise WeightSyncError(f"broadcast over the {self.where()} failed mid-sync at step {step}: {exc}") from exc
        self._join(pending, "receive")
        return sent

    def disconnect(self) -> None:
        self.group = self.store = None

    def _rpc_in_background(self, body: dict, deadline: Deadline) -> tuple[threading.Thread, dict, Deadline]:
        """The worker side blocks in the collective until we broadcast, so its HTTP call runs aside."""
        box: dict = {}

        def call():
            try:
                box["result"] = self.server.post("/collective_rpc", body, deadline)
            except Exception as exc:  # noqa: BLE001 - reported in _join with host and port
                box["error"] = exc

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        return thread, box, deadline

    def _raise_request_error(self, pending: tuple[threading.Thread, dict, Deadline], what: str) -> None:
        """Wait out the HTTP call beside a collective; if vLLM hung or failed it, raise that
        (VLLMHungError as it is, a dead server's error naming the group), so the guard sees it."""
        thread, box, deadline = pending
        thread.join(deadline.seconds + 5)
        error = box.get("error")
        if isinstance(error, VLLMHungError):
            raise error
        if isinstance(error, VLLMRequestError):
            raise VLLMRequestError(f"{what} over the {self.where()} failed: {error}") from error

    def _join(self, pending: tuple[threading.Thread, dict, Deadline], what: str) -> dict:
        self._raise_request_error(pending, what)
        thread, box, _ = pending
        if thread.is_alive() or "error" in box:
            raise WeightSyncError(f"{what} over the {self.where()} failed: {box.get('error', 'no answer in time')}")
        return box["result"]
