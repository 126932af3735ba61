"""sync=shared: one copy of the weights; the trainer's parameters ARE vLLM's tensors.

vLLM's worker (our extension, bridges/vllm_worker.py) exports a handle to every parameter's
storage; the trainer builds its HF model on `meta` and makes each parameter a view of vLLM's
tensor (`qkv_proj` -> q/k/v and `gate_up_proj` -> gate/up by `narrow`, a tied lm_head through
the embedding). So `optimizer.step()` is the sync: 0 bytes move. What remains is keeping vLLM
from reading half-written weights (generation is paused around the step) and from reusing KV
blocks computed by the old weights (the prefix cache is reset after it).

Single process per side, same device, full fine-tuning: what it cannot serve is declared in
`SharedBridge.capabilities` and refused at start with its reason (lab/compose.py), as is an
architecture without a name map; the running server's worker is checked again (`check_worker`).
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bridges.base import Capabilities, SyncStats, VerifiedBridge
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


def check_worker(info: dict, n_workers: int, device: torch.device) -> None:
    """What only the running server can tell: one worker, on the trainer's device."""
    if n_workers != 1 or info["tensor_parallel_size"] != 1 or info["pipeline_parallel_size"] != 1:
        raise SharedWeightsError(f"sync=shared needs one vLLM worker (tp=pp=1); the server has {n_workers} "
                                 f"(tp={info['tensor_parallel_size']}, pp={info['pipeline_parallel_size']})")
    served = torch.device(info["device"])
    same = served.type == device.type and (
        device.type != "cuda" or str(torch.cuda.get_device_properties(device).uuid) == info["device_uuid"])
    if not same:
        raise SharedWeightsError(f"sync=shared needs the trainer and vLLM on the same device: trainer on {device}, "
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
    sync_name = "shared"
    capabilities = Capabilities(
        model_from_server=True,
        lora="the trainer's parameters are vLLM's tensors, so a merged adapter would have to be written over the "
             "frozen base it trains against (use sync=reload or adapter)",
        trainer_procs="it trains vLLM's single copy of the weights and cannot shard it over several trainer "
                      "processes (use sync=reload or broadcast under torchrun)",
        async_rollouts="vLLM reads the trainer's weights in place, so they change while rollouts are generated",
        separate_devices="the trainer's parameters are views of vLLM's tensors, so vLLM must run on the trainer's "
                         "device (use hardware=gpu)",
        vllm_parallel="a TP shard or a DP replica of vLLM's weights is not the trainer's one tensor "
                      "(set hardware.vllm_tp=1 hardware.vllm_dp=1)")

    def __init__(self, device: str = "cpu", pause_mode: str = "wait", **probe):
        super().__init__(**probe)
        self.device = torch.device(device)
        self.pause_mode = pause_mode
        self.pause_ms = 0.0
        self.served: dict[str, torch.Tensor] = {}
        self.worker: dict = {}
        self.files_record = None  # the worker's record of its /dev/shm files, when we own the server

    def server_args(self) -> list[str]:
        # vLLM's compiled CPU graph bakes in its packed GEMM kernels: only eager execution
        # computes from the shared tensors (bridges/vllm_worker.py SharedWeightsMixin). On GPU
        # vLLM computes from the parameters themselves, and in-place steps keep their addresses,
        # so CUDA graphs see every update.
        return ["--enforce-eager"] if self.device.type == "cpu" else []

    def build_model(self, path: str, dtype: str, device: str, server: VLLMServer) -> torch.nn.Module:
        """The trainer's model, every parameter a view of the served one (no weight is loaded):
        `server` runs already (capabilities.model_from_server: the run starts it first)."""
        config = AutoConfig.from_pretrained(path)
        fused = name_map(config)
        remove_stale()  # files of earlier servers that were killed (their owners are gone) before removing them
        return self.attach_served(config, fused, dtype, torch.device(device), server)

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
        """Verify only; the sync's cost is the pause/reset/resume around the step, its own field."""
        stats = super().sync(step)
        stats.pause_ms = self.pause_ms
        return stats

    def close(self) -> None:
        """The shared-memory files of a server we started go now (both sides keep their mappings
        until they exit): vLLM's shutdown SIGKILLs its workers and torch's shm manager, so nothing
        on its side removes them. An attached server keeps its files for the next trainer."""
        if self.files_record is not None:
            release_segments(self.files_record)
