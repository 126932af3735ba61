"""mode=shared: one copy of the weights; the trainer's parameters ARE vLLM's tensors.

vLLM's worker (our extension, bridges/vllm_worker.py) exports a handle to every parameter's
storage; the trainer builds its HF model on `meta` and makes each parameter a view of vLLM's
tensor (`qkv_proj` -> q/k/v and `gate_up_proj` -> gate/up by `narrow`, a tied lm_head through
the embedding). So `optimizer.step()` is the sync: 0 bytes move. What remains is keeping vLLM
from reading half-written weights (generation is paused around the step) and from reusing KV
blocks computed by the old weights (the prefix cache is reset after it).

Single process per side, same device: TP would shard vLLM's tensors, so it is refused at start,
as are a trainer on another device than vLLM and an architecture without a name map.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bridges.base import SyncStats, VerifiedBridge
from bridges.names import hf_views, name_map
from serving.server import VLLMServer
from bridges.shared_memory import attach_tensor, manifest_path, release_segments, remove_stale
from grpo.precision import torch_dtype


class SharedWeightsError(RuntimeError):
    """The trainer cannot share vLLM's weights in this setup (raised at start)."""


def physical_cuda_device(device: torch.device) -> str:
    """The GPU behind `device` as CUDA_VISIBLE_DEVICES of a child would name it."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    index = device.index or 0
    return visible.split(",")[index].strip() if visible else str(index)


def check_topology(vllm_tp: int, vllm_dp: int, device: str, vllm_devices: str | None) -> None:
    """What config alone tells us, checked before vLLM starts."""
    if vllm_tp != 1 or vllm_dp != 1:
        raise SharedWeightsError(f"mode=shared needs hardware.vllm_tp=1 and hardware.vllm_dp=1 (got tp={vllm_tp}, "
                                 f"dp={vllm_dp}): a TP shard or a DP replica is not the trainer's one tensor")
    dev = torch.device(device)
    if dev.type == "cuda" and vllm_devices is not None and str(vllm_devices).strip() != physical_cuda_device(dev):
        raise SharedWeightsError(f"mode=shared needs the trainer and vLLM on the same GPU: hardware.device={device} "
                                 f"is GPU {physical_cuda_device(dev)}, hardware.vllm_devices={vllm_devices}")


def check_worker(info: dict, n_workers: int, device: torch.device) -> None:
    """What only the running server can tell: one worker, on the trainer's device."""
    if n_workers != 1 or info["tensor_parallel_size"] != 1 or info["pipeline_parallel_size"] != 1:
        raise SharedWeightsError(f"mode=shared needs one vLLM worker (tp=pp=1); the server has {n_workers} "
                                 f"(tp={info['tensor_parallel_size']}, pp={info['pipeline_parallel_size']})")
    served = torch.device(info["device"])
    same = served.type == device.type and (
        device.type != "cuda" or str(torch.cuda.get_device_properties(device).uuid) == info["device_uuid"])
    if not same:
        raise SharedWeightsError(f"mode=shared needs the trainer and vLLM on the same device: trainer on {device}, "
                                 f"vLLM on {info['device']} (uuid {info['device_uuid']})")


def meta_model(config, dtype: str, device: torch.device) -> torch.nn.Module:
    """The HF model with no parameter memory; computed buffers (rotary tables) built on `device`."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent, _, child = name.rpartition(".")
            with torch.device(device):
                setattr(model.get_submodule(parent), child, type(module)(module.config))
    return model


def attach(model: torch.nn.Module, views: dict[str, torch.Tensor]) -> None:
    """Replace each meta parameter by a Parameter over its view; tied parameters stay tied."""
    old = dict(model.named_parameters())
    new = {id(old[name]): torch.nn.Parameter(view, requires_grad=old[name].requires_grad)
           for name, view in views.items()}
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None and id(param) in new:
                module._parameters[key] = new[id(param)]


class SharedBridge(VerifiedBridge):
    mode = "shared"
    shares_weights = True

    def __init__(self, vllm_tp: int = 1, vllm_dp: int = 1, device: str = "cpu", vllm_devices: str | None = None,
                 pause_mode: str = "wait", **probe):
        super().__init__(**probe)
        check_topology(vllm_tp, vllm_dp, device, vllm_devices)
        self.device = torch.device(device)
        self.pause_mode = pause_mode
        self.pause_ms = 0.0
        self.served: dict[str, torch.Tensor] = {}
        self.worker: dict = {}
        self.files_record = None  # the worker's record of its /dev/shm files, when we own the server

    def check_trainer_procs(self, n: int) -> None:
        if n > 1:
            raise ValueError(f"mode=shared trains vLLM's single copy of the weights and cannot shard it over {n} "
                             "trainer processes (a copy sharded like vLLM's TP is not built): run it with one "
                             "process, or use mode=reload or mode=lora under torchrun")

    def server_args(self) -> list[str]:
        # vLLM's compiled CPU graph bakes in its packed GEMM kernels: only eager execution
        # computes from the shared tensors (bridges/vllm_worker.py SharedWeightsMixin). On GPU
        # vLLM computes from the parameters themselves, and in-place steps keep their addresses,
        # so CUDA graphs see every update.
        return ["--enforce-eager"] if self.device.type == "cpu" else []

    def build_model(self, path: str, dtype: str, device: str, server: VLLMServer) -> torch.nn.Module:
        """The trainer's model, every parameter a view of the served one (no weight is loaded).

        Starts `server` (a no-op if started), after the checks that need no vLLM, and stops it
        when its weights cannot be shared, so a failed start leaves no server behind."""
        config = AutoConfig.from_pretrained(path)
        fused = name_map(config)
        remove_stale()  # files of earlier servers that were killed before they could remove them
        server.start()
        try:
            return self.attach_served(config, fused, dtype, torch.device(device), server)
        except Exception:
            server.stop()
            raise

    def attach_served(self, config, fused: dict, dtype: str, device: torch.device,
                      server: VLLMServer) -> torch.nn.Module:
        results = server.post("/collective_rpc", {"method": "export_shared_weights"}, server.deadline("sync_s"))["results"]
        self.worker = results[0]
        # Our server: its files end with our run. The record is named now, while its worker lives:
        # its name holds the worker's start time, unknowable once the worker is gone.
        self.files_record = manifest_path(self.worker["pid"]) if not server.external else None
        check_worker(self.worker, len(results), device)
        local = device.index if device.type == "cuda" else None
        self.served = {name: attach_tensor(h, local) for name, h in self.worker["params"].items()}
        model = meta_model(config, dtype, device)
        hf_shapes = {name: p.shape for name, p in model.named_parameters()}
        attach(model, hf_views(self.served, hf_shapes, fused))
        wrong = [f"{n}: {p.dtype}" for n, p in model.named_parameters() if p.dtype != torch_dtype(dtype)]
        if wrong:
            raise SharedWeightsError(f"vLLM serves other dtypes than model.dtype={dtype}: {wrong[:5]}")
        return model

    @contextlib.contextmanager
    def step_context(self):
        """Pause generation while the optimizer writes vLLM's weights; stale KV blocks go after it."""
        t0 = time.perf_counter()
        self.server.post(f"/pause?mode={self.pause_mode}&clear_cache=false")
        t1 = time.perf_counter()
        try:
            yield
            if self.policy.device.type == "cuda":
                torch.cuda.synchronize(self.policy.device)  # vLLM reads on its own stream
        finally:
            t2 = time.perf_counter()
            try:
                self.server.reset_prefix_cache()
            finally:  # generation resumes either way; a refused reset then stops the run
                self.server.post("/resume")
                self.pause_ms = (t1 - t0 + time.perf_counter() - t2) * 1e3

    def push(self, step: int) -> int:
        return 0  # the optimizer step already wrote vLLM's tensors

    def sync(self, step: int) -> SyncStats:
        """Verify only; the sync cost is the pause/reset/resume around the step."""
        stats = super().sync(step)
        stats.ms = self.pause_ms
        return stats

    def close(self) -> None:
        """The shared-memory files of a server we started go now (both sides keep their mappings
        until they exit): vLLM's shutdown SIGKILLs its workers and torch's shm manager, so nothing
        on its side removes them. An attached server keeps its files for the next trainer."""
        if self.files_record is not None:
            release_segments(self.files_record)
