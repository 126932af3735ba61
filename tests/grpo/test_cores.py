"""The trainer's side of a core split (hardware.trainer_cpus): every thread it has, OpenMP's
included, moves to its cores, with one torch thread per core unless torch_threads says."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, os, sys, torch
from runtime.config import cores
from runtime.cores import pinned_trainer
torch.set_num_threads(2)
torch.randn(512, 512) @ torch.randn(512, 512)  # starts OpenMP's worker threads on every core

def seen():
    torch.randn(512, 512) @ torch.randn(512, 512)
    cores = {tid: sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}
    return {"threads": torch.get_num_threads(), "cores": sorted(map(tuple, cores.values()))}

with pinned_trainer(json.loads(sys.argv[1]), json.loads(sys.argv[2])):
    inside = seen()
    cores()["rule"]("hardware.vllm_cpus", [0])  # a pinned job's config is still checked against every core
print(json.dumps({"inside": inside, "after": seen()}))
"""


def probe(cpus, threads) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cpus), json.dumps(threads)],
                         capture_output=True, text=True, timeout=120, check=True)
    return {when: {"threads": seen["threads"], "cores": set(map(tuple, seen["cores"]))}
            for when, seen in json.loads(out.stdout).items()}


ALL = tuple(sorted(os.sched_getaffinity(0)))


def test_every_thread_moves_to_the_trainer_cores_with_a_thread_per_core():
    seen = probe([1], None)
    assert seen["inside"] == {"threads": 1, "cores": {(1,)}}  # OpenMP's threads, started before the pin, too


def test_leaving_gives_the_cores_and_threads_back():
    """A Hydra multirun runs its jobs in one process: a pinned job must not pin the next one."""
    assert probe([1], None)["after"] == {"threads": 2, "cores": {ALL}}


def test_torch_threads_wins_over_the_core_count():
    assert probe([1], 3)["inside"]["threads"] == 3


def test_no_cores_leaves_affinity_alone():
    assert probe(None, None)["inside"] == {"threads": 2, "cores": {ALL}}


def test_a_core_outside_the_machine_fails_by_name(tmp_path):
    from conftest import make_cfg
    from runtime.config import validate

    with pytest.raises(ValueError, match=r"hardware.trainer_cpus=\[9\]: must be a non-empty list of the cores"):
        validate(make_cfg("hardware.trainer_cpus=[9]"))
