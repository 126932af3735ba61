"""mode=broadcast: vLLM runs as its own server (own devices, TP/DP, possibly another host); the
trainer pushes new weights over a collective after each step (TRL's `vllm_mode="server"`,
ms-swift's external rollout).

GPU (trainer on cuda): vLLM's native weight-transfer engine — the server runs with
`--weight-transfer-config '{"backend": "nccl"}'` (`server_args()`), the trainer drives
`/init_weight_transfer_engine`, `/start_weight_update`, `/update_weights`, `/finish_weight_update`
through vLLM's own trainer-side `NCCLWeightTransferEngine`, packed into `bucket_mb` buffers.
CPU: vLLM has no gloo engine, so our worker extension joins a gloo group with the trainer
(rank 0) and receives flat buckets, one broadcast per bucket: TRL's one HTTP call and one
broadcast per tensor is what made its syncs slow. `bucket_mb=0` sends one tensor per broadcast.
Every collective has `timeout_s`, so a server that goes away mid-sync or a group that cannot form
ends in an error naming host and port, never a hang.
"""

from __future__ import annotations

import datetime
import threading
from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist

from bridges.base import VerifiedBridge, WeightSyncError
from serving.server import free_port


def same_device(trainer_device: str, vllm_devices: Optional[str]) -> bool:
    """Trainer on cuda:N while vLLM's CUDA_VISIBLE_DEVICES includes N (or is unset)."""
    dev = torch.device(trainer_device)
    if dev.type != "cuda":
        return False
    if vllm_devices is None:
        return True
    return str(dev.index or 0) in [d.strip() for d in vllm_devices.split(",")]


def buckets(named: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Group tensors of one dtype into buckets of about `bucket_bytes` (a tensor never splits);
    bucket_bytes <= 0 gives one tensor per bucket."""
    by_dtype: dict[torch.dtype, list] = defaultdict(list)
    for name, t in named:
        by_dtype[t.dtype].append((name, t))
    out: list[list] = []
    for group in by_dtype.values():
        current, size = [], 0
        for name, t in group:
            if current and size + t.numel() * t.element_size() > bucket_bytes:
                out.append(current)
                current, size = [], 0
            current.append((name, t))
            size += t.numel() * t.element_size()
        out.append(current)
    return out


class BroadcastBridge(VerifiedBridge):
    mode = "broadcast"

    def __init__(self, group_host: str = "127.0.0.1", group_port: Optional[int] = None, bucket_mb: float = 64.0,
                 timeout_s: float = 60.0, trainer_device: str = "cpu", vllm_devices: Optional[str] = None, **probe):
        super().__init__(**probe)
        if same_device(trainer_device, vllm_devices):
            raise ValueError(f"mode=broadcast: trainer device {trainer_device} is also a vLLM device "
                             f"(hardware.vllm_devices={vllm_devices}); NCCL cannot run both ends on one GPU. "
                             "Give vLLM its own GPUs.")
        self.group_host = group_host
        self.group_port = group_port
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.timeout_s = timeout_s
        self.backend = "nccl" if torch.device(trainer_device).type == "cuda" else "gloo"
        self.group = None
        self.engine = None  # vLLM's NCCL trainer engine (GPU)

    def server_args(self) -> list[str]:
        return ["--weight-transfer-config", '{"backend": "nccl"}'] if self.backend == "nccl" else []

    def where(self) -> str:
        return f"weight group {self.group_host}:{self.group_port} (vLLM at {self.server.base_url})"

    def setup(self, policy, server, client, run_dir) -> None:
        super().setup(policy, server, client, run_dir)
        self.group_port = self.group_port or free_port(self.group_host)
        workers = int(server.get("/get_world_size")["world_size"])
        if self.backend == "nccl":
            self._setup_nccl_engine(workers)
            return
        timeout = datetime.timedelta(seconds=self.timeout_s)
        store = dist.TCPStore(self.group_host, self.group_port, 1 + workers, is_master=True, timeout=timeout,
                              wait_for_workers=False)
        self._store = store  # keep the rendezvous alive as long as the group
        joined = self._rpc_in_background("join_weight_group", host=self.group_host, port=self.group_port,
                                         world_size=1 + workers, rank_offset=1, timeout_s=self.timeout_s)
        try:
            self.group = dist.ProcessGroupGloo(dist.PrefixStore("grpo-weights", store), 0, 1 + workers, timeout)
        except RuntimeError as exc:
            raise WeightSyncError(f"could not form the {self.where()} within {self.timeout_s:.0f}s "
                                  f"(mode.bridge.timeout_s): {exc}") from exc
        self._join(joined, "join")

    def _setup_nccl_engine(self, workers: int) -> None:
        from vllm.distributed.weight_transfer.base import ModuleSource
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLWeightTransferEngine

        info = NCCLTrainerInitInfo(master_address=self.group_host, master_port=self.group_port,
                                   world_size=1 + workers, rank=0, packed=True,
                                   packed_buffer_size_bytes=max(self.bucket_bytes, 2**20))
        try:
            self.engine = NCCLWeightTransferEngine.trainer_init(
                info, client=HTTPVLLMWeightSyncClient(self.server.base_url, timeout=self.timeout_s),
                source=ModuleSource(self.policy.model))
        except Exception as exc:
            raise WeightSyncError(f"could not form the NCCL {self.where()}: {exc}") from exc

    def _rpc_in_background(self, method: str, **kwargs) -> tuple[threading.Thread, dict]:
        """The worker side blocks in the collective until we broadcast, so its HTTP call runs aside."""
        box: dict = {}

        def call():
            try:
                box["result"] = self.server.post("/collective_rpc", {"method": method, "kwargs": kwargs},
                                                 timeout=self.timeout_s + 30)
            except Exception as exc:  # noqa: BLE001 - reported in _join with host and port
                box["error"] = exc

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        return thread, box

    def _join(self, pending: tuple[threading.Thread, dict], what: str) -> dict:
        thread, box = pending
        thread.join(self.timeout_s + 60)
        if thread.is_alive() or "error" in box:
            raise WeightSyncError(f"{what} over the {self.where()} failed: {box.get('error', 'no answer in time')}")
        return box["result"]

    def push(self, step: int) -> int:
        named = [(n, p.detach()) for n, p in self.policy.model.named_parameters()]
        if self.engine is not None:
            try:
                self.engine.send_weights()
            except Exception as exc:
                raise WeightSyncError(f"NCCL update over the {self.where()} failed at step {step}: {exc}") from exc
            return sum(t.numel() * t.element_size() for _, t in named)
        plan = buckets(named, self.bucket_bytes)
        meta = [[[n, str(t.dtype).removeprefix("torch."), list(t.shape)] for n, t in bucket] for bucket in plan]
        pending = self._rpc_in_background("receive_weights", buckets=meta)
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        sent = 0
        try:
            for bucket in plan:
                flat = torch.cat([t.reshape(-1) for _, t in bucket])
                self.group.broadcast([flat], opts).wait()
                sent += flat.numel() * flat.element_size()
        except RuntimeError as exc:
            raise WeightSyncError(f"broadcast over the {self.where()} failed mid-sync at step {step}: {exc}") from exc
        self._join(pending, "receive")
        self.server.post("/reset_prefix_cache")
        return sent

    def close(self) -> None:
        self.group = None
