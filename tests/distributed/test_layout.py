"""Scale-out presets compose on top of hardware=gpu, and a layout needing more GPUs than a node has
fails at start saying how many (a pure config check: the device count is a parameter)."""

from __future__ import annotations

import pytest

from conftest import make_cfg
from runtime import distributed


def test_gpu_node_builds_on_gpu_and_needs_eight_gpus():
    hw = make_cfg("hardware=gpu_node").hardware
    assert (hw.device, hw.autocast, hw.trainer_procs, hw.vllm_tp, hw.vllm_dp) == ("cuda:0", "auto", 4, 2, 2)
    distributed.check_devices(hw, available=8)
    with pytest.raises(ValueError, match="need 8 GPUs per node; this node has 4"):
        distributed.check_devices(hw, available=4)


def test_a_bigger_vllm_needs_more_gpus():
    hw = make_cfg("hardware=gpu_node", "hardware.vllm_tp=4").hardware
    with pytest.raises(ValueError, match=r"4 trainer process\(es\) \+ vLLM TP 4 x DP 2 on its own GPUs need 12"):
        distributed.check_devices(hw, available=8)


def test_multi_node_counts_trainers_only_and_sizes_the_slurm_job():
    cfg = make_cfg("hardware=multi_node", "hardware.nodes=3")
    distributed.check_devices(cfg.hardware, available=8)
    with pytest.raises(ValueError, match="need 8 GPUs per node; this node has 7"):
        distributed.check_devices(cfg.hardware, available=7)


def test_cpu_needs_no_gpu():
    distributed.check_devices(make_cfg().hardware, available=0)


def test_rows_must_split_evenly_over_trainer_processes(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    distributed.check_rows(12)
    with pytest.raises(ValueError, match="8 rows do not split evenly over 3 trainer processes"):
        distributed.check_rows(8)
    monkeypatch.setattr(distributed, "rank", lambda: 2)
    assert distributed.shard_rows(12) == slice(8, 12)


@pytest.mark.parametrize("sync", ["shared"])
def test_syncs_that_cannot_run_on_several_processes_say_so_at_start(sync):
    from lab.compose import Refused, check

    check(make_cfg(f"sync={sync}"), procs=1)
    with pytest.raises(Refused, match=f"sync={sync} cannot run with 2 trainer processes"):
        check(make_cfg(f"sync={sync}"), procs=2)


@pytest.mark.parametrize("overrides", [("mode=reload",), ("mode=lora",), ("mode=legacy",), ("mode=broadcast",),
                                       ("mode=lora", "sync=adapter"), ("finetune=lora", "sync=broadcast")])
def test_reload_lora_legacy_and_broadcast_run_on_several_processes(overrides):
    from lab.compose import check

    check(make_cfg(*overrides), procs=4)
