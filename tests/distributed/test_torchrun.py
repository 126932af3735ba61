"""`torchrun --nproc_per_node=2 train.py` is the one-process run: the same rewards, losses and
gradient norms step for step (the rollout is rank 0's, every normaliser global), also across a
sharded checkpoint and resume, every sync verified by the probe, one run dir written by rank 0
alone; a killed rank stops the job. Attached to the session vLLM server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, make_cfg, restore_pristine, run_precision
from grpo.precision import Precision
from lab.loop import train
from runtime.records import read_jsonl

RUN = ("log.wandb.mode=disabled", "log.progress=false", "eval.enabled=false", "train.steps=3",
       "train.prompts_per_step=2", "train.group_size=4", "rollout.max_tokens=8", "hardware.torch_threads=1")


def torchrun(nproc: int, run_dir, *overrides: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "train.py",
                           *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)


def assert_same_run(one: list[dict], two: list[dict], precision: Precision) -> None:
    """Tolerances from the precision the runs computed in: two processes reduce in another order.
    The loss is ~0 (group-centred advantages times IS weights ~1): ~1e-8 apart in fp32; in bf16
    each IS weight exp(trainer - vLLM logprob) carries the bf16 gap, so the loss is ~1e-3 and the
    two runs' losses agree to about a tenth of the gap tolerance (measured 9e-4 apart)."""
    rtol = precision.rtol
    loss_atol = 1e-6 if precision.compute == torch.float32 else precision.gap_tolerance / 10
    assert [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["completion_len_mean"] == a["completion_len_mean"]
        for key in ("reward_mean", "reward_std", "grad_norm", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=rtol), (b["step"], key)
        assert b["loss"] == pytest.approx(a["loss"], abs=loss_atol)
    assert min(m["grad_norm"] for m in two) > 1e-2  # the weights got gradients
    assert len({m["reward_mean"] for m in two}) > 1  # and what vLLM served changed


def run_both(attach, vllm_server, tiny_model_path, tmp_path, *overrides, hardware=()):
    """3 steps on one process; on two, 2 steps with a sharded checkpoint, then a resume for step 3
    (exact resume on two processes comes with the comparison)."""
    one = train(make_cfg(*overrides, attach, *RUN, *hardware), tmp_path / "one")
    two = tmp_path / "two"
    done = torchrun(2, two, *overrides, attach, *RUN, *hardware, "train.steps=2", "train.checkpoint_every=2")
    if done.returncode == 0:
        done = torchrun(2, two, *overrides, attach, *RUN, *hardware, "train.checkpoint_every=2", f"resume={two}")
    restore_pristine(vllm_server, tiny_model_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (two / "checkpoints" / "step-000002" / "dcp" / ".metadata").is_file()
    assert [e["step"] for e in read_jsonl(two / "events.jsonl") if e["event"] == "resumed"] == [2]
    return one, two


# CI runs reload with the trainer in fp32 and in bf16 whatever the CPU's default (hardware.autocast=auto).
@pytest.mark.slow
@pytest.mark.parametrize("mode, autocast", [
    ("reload", "null"), ("reload", "bfloat16"),
    pytest.param("lora", "auto", marks=pytest.mark.heavy), pytest.param("broadcast", "auto", marks=pytest.mark.heavy)])
def test_two_processes_train_as_one(attach, vllm_server, tiny_model_path, tmp_path, mode, autocast):
    one, two = run_both(attach, vllm_server, tiny_model_path, tmp_path, f"mode={mode}",
                        hardware=(f"hardware.autocast={autocast}",))
    precision = run_precision(two)
    assert precision == run_precision(tmp_path / "one")
    assert autocast != "bfloat16" or precision.compute == torch.bfloat16
    assert autocast != "null" or precision.compute == torch.float32
    assert_same_run(one, read_jsonl(two / "metrics.jsonl"), precision)
    syncs = read_jsonl(two / "sync.jsonl")
    assert len(syncs) >= 3 and all(s["probe_max_diff"] <= precision.probe_tolerance for s in syncs)  # + the resume's push
    assert (two / "final" / ("adapter_model.safetensors" if mode == "lora" else "model.safetensors")).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # one run dir for both ranks


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices: a trainer process each")
def test_two_gpu_processes_train_as_one(attach, vllm_server, tiny_model_path, tmp_path):
    """The NCCL path: one trainer process per GPU (FSDP2 over NCCL)."""
    one, two = run_both(attach, vllm_server, tiny_model_path, tmp_path, "mode=reload",
                        hardware=("hardware=gpu", "hardware.autocast=null"))
    assert_same_run(one, read_jsonl(two / "metrics.jsonl"), run_precision(tmp_path / "two"))


@pytest.mark.slow
@pytest.mark.heavy
def test_a_killed_rank_stops_the_job_and_leaves_no_checkpoint_marked_complete(attach, tmp_path):
    """SIGKILL rank 1 after step 2 of a run that checkpoints every step: torchrun stops rank 0 within
    seconds and names rank 1; every step-* checkpoint is whole, a save cut short has no marker."""
    import psutil

    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "train.py",
                            "mode=reload", attach, *RUN, "train.steps=40", "train.checkpoint_every=1",
                            f"hydra.run.dir={run_dir}"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not ((run_dir / "metrics.jsonl").is_file() and
                   len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 2):
            assert job.poll() is None and time.monotonic() < deadline, "the run did not reach step 2"
            time.sleep(0.1)
        rank1 = next(p for p in psutil.Process(job.pid).children(recursive=True)
                     if p.environ().get("RANK") == "1" and "train.py" in " ".join(p.cmdline()))
        killed = time.monotonic()
        rank1.kill()
        out, _ = job.communicate(timeout=120)
        stopped_s = time.monotonic() - killed
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert stopped_s < 60, stopped_s  # measured ~1.1 s on 2 loaded cores
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: -9", out), out[-3000:]
    saved = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-")]
    cut = [p for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("step-")]  # .tmp-*, if any
    assert saved and all((p / "COMPLETE").is_file() and (p / "dcp" / ".metadata").is_file() for p in saved)
    assert not any((p / "COMPLETE").exists() for p in cut)
