"""sync=broadcast over NCCL (hardware.collective=nccl): vLLM's own weight-transfer engine,
trainer GPU -> vLLM's GPUs.

The server runs with `--weight-transfer-config '{"backend": "nccl"}'` (`server_args`); the
trainer side is vLLM's `NCCLTrainerWeightTransferEngine`, built by vLLM's trainer factory from
our init info: `trainer_init` opens rank 0 and has the workers join through
`/init_weight_transfer_engine`; `send_weights` drives
`/start_weight_update`, `/update_weights` (beside the broadcast of packed `bucket_mb` buffers)
and `/finish_weight_update`. Its control plane goes through `ServerSyncClient`, i.e. our
server's session, which carries the API key.

What the engine leaves to its caller, done here:
- its communicator opens on the *current* CUDA device and asserts that tensors live there, and
  the current device is per thread: every engine call runs under `torch.cuda.device(trainer)`;
- its packed producer copies parameters on streams of its own that do not wait for the one the
  optimizer stepped on: the trainer's device is synchronized before sending;
- NCCL has no time limit: each call runs in a thread joined with `timeout_s`; past it the group
  is abandoned (a hung collective cannot be cancelled) and the sync fails naming host and port;
- the workers hold their communicator until told: `close()` shuts both ends down.
The GPU check is by device UUID, as the workers report it: NCCL cannot put two ranks on one GPU,
and CUDA_VISIBLE_DEVICES renumbers GPUs differently in each process.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable, Optional

import torch

from bridges.base import Capabilities, WeightSyncError
from bridges.broadcast import BroadcastBridge
from bridges.weights import Weights
from runtime import distributed
from serving.server import Deadline, VLLMRequestError, VLLMServer

WEIGHT_TRANSFER_CONFIG = {"backend": "nccl"}
MIN_BUFFER_BYTES = 2**20  # bucket_mb=0 (one tensor per broadcast on gloo) still packs here


def trainer_init_info(host: str, port: int, world_size: int, bucket_bytes: int):
    """vLLM's trainer-side init info: we are rank 0, the sender; buffers of `bucket_bytes`."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    return NCCLTrainerInitInfo(master_address=host, master_port=port, world_size=world_size, rank=0,
                               packed=True, packed_buffer_size_bytes=max(bucket_bytes, MIN_BUFFER_BYTES))


def weight_source(weights: Weights, bucket_bytes: int):
    """vLLM's `WeightSource` over our `Weights`: what vLLM should serve (HF names, served dtype,
    LoRA merged), each pass a fresh plan gathered bucket by bucket."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class Source(WeightSource):
        def metadata(self) -> list:
            return [ParamMeta(n, t.dtype, tuple(t.shape)) for b in weights.buckets(bucket_bytes) for n, t in b.items()]

        def __iter__(self):
            for bucket in distributed.gathered(weights.buckets(bucket_bytes)):
                yield from bucket.items()

    return Source()


def open_engine(info, server: VLLMServer, weights: Weights, timeout_s: float):
    """vLLM's trainer engine for `info`, joined with the workers; it sends `weights` under their
    HF names (vLLM's `load_weights` maps them)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    return WeightTransferTrainerFactory.trainer_init(info, client=ServerSyncClient(server, timeout_s),
                                                     source=weight_source(weights, info.packed_buffer_size_bytes))


class ServerSyncClient:
    """vLLM's `VLLMWeightSyncClient` protocol over the weight-transfer HTTP routes of `server`."""

    def __init__(self, server: VLLMServer, timeout_s: float):
        self.server = server
        self.timeout_s = timeout_s

    def _post(self, path: str, body: Optional[dict] = None) -> None:
        self.server.post(path, body, Deadline(self.timeout_s, "sync.bridge.timeout_s"))

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._post("/init_weight_transfer_engine", {"init_info": init_info})

    def start_weight_update(self) -> None:
        self._post("/start_weight_update")

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self._post("/update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: Optional[str] = None) -> None:
        self._post("/finish_weight_update", None if weight_version is None else {"weight_version": weight_version})

    def shutdown_weight_transfer_engine(self) -> None:
        self._post("/shutdown_weight_transfer_engine")


def shared_gpus(trainer_uuid: str, workers: list[dict]) -> list[dict]:
    """The vLLM workers (`WorkerExtension.device_info()` answers) on the trainer's GPU."""
    return [w for w in workers if w.get("device_uuid") == trainer_uuid]


class NcclBroadcastBridge(BroadcastBridge):
    capabilities = Capabilities(
        same_device="NCCL moves weights GPU to GPU and cannot put two ranks on one device: give vLLM GPUs of its "
                    "own (hardware=gpu_split), or use hardware.collective=gloo",
        trainer_procs="vLLM's NCCL engine is opened by trainer rank 0 alone, so a model sharded over several "
                      "trainer processes cannot be sent through it (hardware.collective=gloo can)")

    def __init__(self, **common):
        super().__init__(**common)
        self.engine = None  # vLLM's NCCLTrainerWeightTransferEngine while the group exists

    def server_args(self) -> list[str]:
        return ["--weight-transfer-config", json.dumps(WEIGHT_TRANSFER_CONFIG)]

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def join(self, world_size: int) -> None:
        if self.device.type != "cuda":
            raise WeightSyncError(f"NCCL needs the trainer on a GPU (trainer on {self.device}); on CPU "
                                  "sync=broadcast runs over hardware.collective=gloo (hardware=cpu)")
        self.check_devices()
        info = trainer_init_info(self.group_host, self.port, world_size, self.bucket_bytes)
        self.engine = self._within(lambda: open_engine(info, self.server, self.weights, self.timeout_s),
                                   "could not form the NCCL")

    def check_devices(self) -> None:
        workers = self.server.post("/collective_rpc", {"method": "device_info"})["results"]
        uuid = str(torch.cuda.get_device_properties(self.device).uuid)
        if shared_gpus(uuid, workers):
            raise WeightSyncError(f"sync=broadcast over NCCL: the trainer's {self.device} (uuid {uuid}) is also a "
                                  f"vLLM GPU ({[w['device'] for w in workers]}); NCCL cannot put two ranks on one "
                                  f"GPU. Give vLLM its own GPUs (hardware=gpu_split) or use hardware=gpu (gloo).")

    def send(self, step: int, plan: list[dict[str, torch.Tensor]]) -> int:
        """The engine iterates its source (`weight_source`: the same plan, gathered) itself."""
        torch.cuda.synchronize(self.device)  # the optimizer's kernels finish before other streams read
        self._within(self.engine.send_weights, f"update at step {step} over the NCCL")
        return sum(t.numel() * t.element_size() for bucket in plan for t in bucket.values())

    def disconnect(self) -> None:
        if self.engine is None:
            return
        engine, self.engine = self.engine, None
        try:
            ServerSyncClient(self.server, self.timeout_s).shutdown_weight_transfer_engine()
        except VLLMRequestError:
            pass  # the server is gone (restarted or stopped): its communicator went with it
        with torch.cuda.device(self.device):
            engine.shutdown()

    def _within(self, fn: Callable, what: str):
        """fn() on the trainer's device in a thread, given `timeout_s`: NCCL itself waits forever."""
        box: dict = {}

        def run():
            try:
                with torch.cuda.device(self.device):
                    box["result"] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised below with host and port
                box["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            self.engine = None  # a hung collective cannot be cancelled: never use this group again
            raise WeightSyncError(f"{what} {self.where()}: no answer within {self.timeout_s:.0f}s "
                                  f"(sync.bridge.timeout_s); the group is abandoned")
        if "error" in box:
            raise WeightSyncError(f"{what} {self.where()} failed: {box['error']}") from box["error"]
        return box.get("result")
