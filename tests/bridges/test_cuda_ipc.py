"""The GPU path of mode=shared without vLLM (the GPU machines have none): a producer process
exports a fused tensor with the same helpers vLLM's worker extension uses (CUDA IPC), this
process attaches it, takes an optimizer step on a narrowed view (k of a qkv), and the producer
sees exactly that change, while attaching allocated no GPU memory here (no copy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bridges.shared import SharedWeightsError, check_worker
from bridges.shared_memory import attach_tensor

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRODUCER = """
import json, sys, torch
from bridges.shared_memory import export_tensor
qkv = torch.arange(12 * 4, dtype=torch.float32, device="cuda").reshape(12, 4)
print(json.dumps(export_tensor(qkv)), flush=True)
for _ in sys.stdin:
    torch.cuda.synchronize()
    print(json.dumps(qkv.tolist()), flush=True)
"""


def test_optimizer_step_on_an_ipc_view_reaches_the_producer():
    env = {**os.environ, "PYTHONPATH": REPO}
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env)
    try:
        handle = json.loads(producer.stdout.readline())
        assert handle["kind"] == "cuda"
        torch.cuda.init()
        allocated = torch.cuda.memory_allocated()
        qkv = attach_tensor(handle, cuda_index=torch.cuda.current_device())
        assert torch.cuda.memory_allocated() == allocated, "attaching must not allocate a copy"
        original = torch.arange(12 * 4, dtype=torch.float32).reshape(12, 4)
        assert torch.equal(qkv.cpu(), original)

        q, k, v = qkv.split([4, 4, 4])
        k_param = torch.nn.Parameter(k)
        k_param.grad = torch.ones_like(k_param)
        torch.optim.SGD([k_param], lr=0.5).step()
        torch.cuda.synchronize()

        producer.stdin.write("report\n")
        producer.stdin.flush()
        seen = torch.tensor(json.loads(producer.stdout.readline()))
        expected = original.clone()
        expected[4:8] -= 0.5
        assert torch.equal(seen, expected)
    finally:
        producer.stdin.close()
        producer.wait(timeout=60)


def test_same_gpu_is_checked_by_uuid():
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    worker = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "device": "cuda:0", "device_uuid": uuid}
    check_worker(worker, 1, torch.device("cuda:0"))
    with pytest.raises(SharedWeightsError, match="same device"):
        check_worker({**worker, "device_uuid": "GPU-another"}, 1, torch.device("cuda:0"))
