"""The SLURM launcher's local twin: a real 2-point Hydra multirun through hydra-submitit-launcher
(`hydra/launcher=local`, conf/hydra/launcher/local.yaml), each point run as 2 tasks, i.e. 2
trainer processes joined through submitit's task environment (runtime/distributed.py), as SLURM
would start them. Attached to the session vLLM server, wandb off: the points run at once, and
take turns on the server through its lease (serving/lease.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, restore_pristine
from runtime.records import read_jsonl

pytestmark = pytest.mark.slow


def test_a_two_point_sweep_runs_each_point_on_two_processes(attach, vllm_server, tiny_model_path, tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    done = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2",
         "train.seed=0,1", attach, "train.steps=2", "train.prompts_per_step=2", "train.group_size=4",
         "rollout.max_tokens=8", "eval.enabled=false", "log.wandb.mode=disabled", "log.progress=false",
         "hardware.torch_threads=1", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    restore_pristine(vllm_server, tiny_model_path)
    assert done.returncode == 0, done.stderr[-4000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.jsonl").is_file())
    assert len(jobs) == 2
    firsts = []
    for job in jobs:
        metrics = read_jsonl(job / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [1, 2]  # written once, by rank 0
        syncs = read_jsonl(job / "sync.jsonl")
        assert len(syncs) == 2 and all(s["probe_max_diff"] <= 1e-3 for s in syncs)
        firsts.append(metrics[0]["reward_mean"])
    assert firsts[0] != firsts[1]  # the seeds reached the jobs
    # Each point ran as two submitit tasks: one log per task.
    task_logs = sorted(p.name for p in (sweep / ".submitit").rglob("*_log.out"))
    assert len(task_logs) == 4, task_logs
    # The points ran at once on one attached server: one of them waited for the other's lease.
    waits = [p for p in (sweep / ".submitit").rglob("*_log.out") if "is in use by pid" in p.read_text()]
    assert len(waits) == 1, [p.read_text()[-2000:] for p in waits]
