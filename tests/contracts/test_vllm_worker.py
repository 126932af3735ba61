"""Our worker extension and the bridges' HTTP calls against the installed vLLM, on CPU.

The CPU tests run the extension inside vLLM's CPUWorker, a subclass of the GPU Worker; these check
what only the GPU path or another vLLM version could break: the requests our bridges build reach
the extension's methods through vLLM's real `/collective_rpc` route with arguments they accept,
the worker and model-runner methods the extension calls exist with the arguments it passes, and
the routes the broadcast base reads answer with the keys it reads.

On GPU vLLM 0.32 runs Model Runner V2 (`vllm/v1/worker/gpu/model_runner.py`) unless a feature it
lacks is asked for; on CPU, whose Triton has no backend, the V1 runner the CPU tests exercise. So
the extension's calls are pinned on both runners, V2 first.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
import vllm.config.vllm as vllm_config_module
from vllm.config import VllmConfig
from vllm.config.parallel import ParallelConfig
from vllm.distributed.weight_transfer import nccl_common
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu.model_runner import GPUModelRunner as GPUModelRunnerV2
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker
from vllm.v1.worker.worker_base import WorkerBase

from bridges.broadcast_gloo import join_request, receive_request
from bridges.vllm_worker import WorkerExtension, weight_group_rank
from vllm_routes import running_routes


@pytest.fixture
def routes():
    with running_routes(world_size=4) as served:
        yield served


def binds(method, kwargs: dict) -> None:
    inspect.signature(method).bind(None, **kwargs)  # None stands for the worker (self)


def test_gloo_requests_reach_the_extension_with_arguments_it_takes(routes):
    server, engine = routes
    plan = [{"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(3)}, {"h": torch.zeros(4, dtype=torch.bfloat16)}]
    for body in (join_request("127.0.0.1", 29512, 5, 30.0), receive_request(plan)):
        server.post("/collective_rpc", body)
        method, kwargs = engine.calls[-1][1]["method"], engine.calls[-1][1]["kwargs"]
        assert kwargs == body["kwargs"]
        binds(getattr(WorkerExtension, method), kwargs)
    buckets = engine.calls[-1][1]["kwargs"]["buckets"]
    # The worker rebuilds each tensor from [name, dtype name, shape] alone.
    assert [[(n, getattr(torch, d), tuple(s)) for n, d, s in b] for b in buckets] == \
        [[(n, t.dtype, tuple(t.shape)) for n, t in b.items()] for b in plan]


def test_what_the_broadcast_base_reads_from_vllms_routes(routes):
    server, engine = routes
    assert server.get("/get_world_size")["world_size"] == 4
    assert server.post("/reset_prefix_cache") == {"success": True}
    engine.rpc_results = [{"device": "cuda:1", "device_uuid": "GPU-b", "pid": 7}, "not a dict"]
    assert server.post("/collective_rpc", {"method": "device_info"})["results"] == \
        [{"device": "cuda:1", "device_uuid": "GPU-b", "pid": 7}, "not a dict"]


def test_vllm_on_a_gpu_runs_model_runner_v2(monkeypatch):
    """vLLM's own choice, run with what a CUDA install has: Triton, no VLLM_USE_V2_MODEL_RUNNER,
    none of the features V2 lacks (speculative methods, DBO ...), none that force it."""
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    gpu = SimpleNamespace(attention_config=SimpleNamespace(hisparse_config=None), watermark_config=None,
                          _get_v2_model_runner_unsupported_features=lambda: [])
    assert VllmConfig.use_v2_model_runner.fget(gpu) is True
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", False)  # this CPU's case
    assert VllmConfig.use_v2_model_runner.fget(gpu) is False
    # ... and the GPU worker then builds V2's runner, which every call below reaches.
    source = inspect.getsource(Worker._make_model_runner)
    assert "if self.use_v2_model_runner:" in source and "from vllm.v1.worker.gpu.model_runner import" in source


@pytest.mark.parametrize("runner", [GPUModelRunnerV2, GPUModelRunner], ids=["v2-gpu-default", "v1-cpu"])
def test_runner_methods_the_bridges_reach(runner):
    # reload: POST /collective_rpc reload_weights {weights_path}; gloo: receive_weights streams
    # into reload_weights; both through the worker, which forwards to its runner.
    assert "self.model_runner.reload_weights(*args, **kwargs)" in inspect.getsource(Worker.reload_weights)
    binds(runner.reload_weights, {"weights_path": "/dev/shm/x"})
    binds(runner.reload_weights, {"weights_iterator": iter(()), "is_checkpoint_format": True})
    # mode=shared exports `model_runner.model`'s parameters; the NCCL engine's finish resets LoRA.
    assert "self.model = " in inspect.getsource(runner.load_model)
    assert callable(runner.get_model) and callable(runner.reset_lora_state)


def test_worker_methods_the_extension_calls():
    assert issubclass(CPUWorker, Worker)  # so the CPU tests run the GPU worker's methods
    # served_dtype reads the resolved --dtype where every worker (GPU and CPU) keeps it.
    assert issubclass(Worker, WorkerBase)
    assert "self.model_config = vllm_config.model_config" in inspect.getsource(WorkerBase.__init__)
    # The weight-transfer routes end in these worker methods (present on every vLLM worker).
    for name in ("init_weight_transfer_engine", "start_weight_update", "update_weights", "finish_weight_update",
                 "shutdown_weight_transfer_engine"):
        assert callable(getattr(Worker, name)), name


def test_worker_ranks_are_numbered_as_vllm_numbers_them():
    assert "data_parallel_index" in ParallelConfig.__dataclass_fields__
    assert "parallel_config.data_parallel_index" in inspect.getsource(nccl_common.worker_init_process_group)
    # DP replica 1 of a dense model: vLLM has reset its data_parallel_rank to 0, not its index.
    replica = SimpleNamespace(data_parallel_index=1, data_parallel_rank=0, world_size=2)
    ranks = [weight_group_rank(SimpleNamespace(data_parallel_index=d, world_size=2), r, 1)
             for d in (0, 1) for r in (0, 1)]
    assert ranks == [1, 2, 3, 4]
    assert weight_group_rank(replica, 1, 1) == 4


def test_device_info_names_the_gpu_by_uuid():
    info = WorkerExtension.device_info(SimpleNamespace(device=torch.device("cpu")))
    assert info["device"] == "cpu" and info["device_uuid"] is None and info["pid"] > 0
