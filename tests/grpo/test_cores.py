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
from grpo.cores import pin_trainer
torch.set_num_threads(2)
torch.randn(512, 512) @ torch.randn(512, 512)  # starts OpenMP's worker threads on every core
pin_trainer(json.loads(sys.argv[1]), json.loads(sys.argv[2]))
torch.randn(512, 512) @ torch.randn(512, 512)
cores = {tid: sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}
print(json.dumps({"threads": torch.get_num_threads(), "cores": sorted(map(tuple, cores.values()))}))
"""


def probe(cpus, threads) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cpus), json.dumps(threads)],
                         capture_output=True, text=True, timeout=120, check=True)
    seen = json.loads(out.stdout)
    return {"threads": seen["threads"], "cores": set(map(tuple, seen["cores"]))}


def test_every_thread_moves_to_the_trainer_cores_with_a_thread_per_core():
    seen = probe([1], None)
    assert seen["threads"] == 1
    assert seen["cores"] == {(1,)}  # the main thread and OpenMP's, started before the pin


def test_torch_threads_wins_over_the_core_count():
    assert probe([1], 3)["threads"] == 3


def test_no_cores_leaves_affinity_alone():
    seen = probe(None, None)
    assert seen["threads"] == 2 and seen["cores"] == {tuple(sorted(os.sched_getaffinity(0)))}


def test_a_core_outside_the_machine_fails_by_name(tmp_path):
    from conftest import make_cfg
    from grpo.config import validate

    with pytest.raises(ValueError, match=r"hardware.trainer_cpus=\[9\]: must be a non-empty list of the cores"):
        validate(make_cfg("hardware.trainer_cpus=[9]"))
