"""`torchrun --nproc_per_node=2 train.py` is the one-process run: the same rewards, losses and
gradient norms step for step (the rollout is rank 0's, every normaliser global), every sync
verified by the probe, one run dir written by rank 0 alone. Attached to the session vLLM server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, make_cfg, restore_pristine
from train import train

RUN = ("log.wandb.mode=disabled", "log.progress=false", "eval.enabled=false", "train.steps=3",
       "train.prompts_per_step=2", "train.group_size=4", "rollout.max_tokens=8", "hardware.torch_threads=1")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def torchrun(nproc: int, run_dir, *overrides: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "train.py",
                           *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)


def assert_same_run(one: list[dict], two: list[dict]) -> None:
    assert [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["completion_len_mean"] == a["completion_len_mean"]
        for key in ("reward_mean", "reward_std", "grad_norm", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (b["step"], key)
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)  # ~1e-8: group-centred advantages
    assert min(m["grad_norm"] for m in two) > 1e-2  # the weights got gradients
    assert len({m["reward_mean"] for m in two}) > 1  # and what vLLM served changed


def run_both(attach, vllm_server, tiny_model_path, tmp_path, *overrides, hardware=()):
    one = train(make_cfg(*overrides, attach, *RUN, *hardware), tmp_path / "one")
    done = torchrun(2, tmp_path / "two", *overrides, attach, *RUN, *hardware)
    restore_pristine(vllm_server, tiny_model_path)
    assert done.returncode == 0, done.stderr[-4000:]
    return one, tmp_path / "two"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reload", "lora"])
def test_two_processes_train_as_one(attach, vllm_server, tiny_model_path, tmp_path, mode):
    one, two = run_both(attach, vllm_server, tiny_model_path, tmp_path, f"mode={mode}")
    assert_same_run(one, read_jsonl(two / "metrics.jsonl"))
    syncs = read_jsonl(two / "sync.jsonl")
    assert len(syncs) == 3 and all(s["probe_max_diff"] <= 1e-3 for s in syncs)
    assert (two / "final" / ("adapter_model.safetensors" if mode == "lora" else "model.safetensors")).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # one run dir for both ranks


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices: a trainer process each")
def test_two_gpu_processes_train_as_one(attach, vllm_server, tiny_model_path, tmp_path):
    """The NCCL path: one trainer process per GPU (FSDP2 over NCCL)."""
    one, two = run_both(attach, vllm_server, tiny_model_path, tmp_path, "mode=reload",
                        hardware=("hardware=gpu", "hardware.autocast=null"))
    assert_same_run(one, read_jsonl(two / "metrics.jsonl"))
