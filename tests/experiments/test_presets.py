"""Every benchmark preset composes at every grid point, and runs briefly end to end
(lightning-hydra-template style). A preset `conf/bench/<name>.yaml` is run by the entry
point its header's command gives (`python -m experiments.<entry> -m bench=<name>`), which composes
conf/benchmark.yaml. (conf/experiment/ holds training presets: tests/test_experiment_presets.py.)"""

from __future__ import annotations

import importlib
import itertools
import re

import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import REPO
from experiments.schema import use_schema
from runtime.config import register_configs
from bench_cli import PRESETS, QUIET, bench_cfg, cli

NAMES = [p.stem for p in PRESETS]


def entry(name: str) -> str:
    """The module that runs a preset, from its header's command."""
    command = PRESETS[NAMES.index(name)].read_text().splitlines()[1]
    found = re.match(rf"# python -m experiments\.(\w+) -m bench={name}\b", command)
    assert found, command
    return found.group(1)


def grid(name: str) -> list[list[str]]:
    """The sweep's points, from the composed preset (a preset may build on another's params)."""
    params = bench_cfg(f"bench={name}", hydra=True).hydra.sweeper.params
    return [[f"{k}={v}" for k, v in zip(params, values)]
            for values in itertools.product(*(str(v).split(",") for v in params.values()))]


@pytest.fixture
def bench_schema():
    """Compose as the preset's entry point does; give the training schema back afterwards."""
    yield lambda name: use_schema(importlib.import_module(f"experiments.{entry(name)}").BENCH)
    register_configs()


def test_there_are_presets():
    assert {"rollout_throughput", "sync_latency", "step_time", "step_scaling"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_header_gives_the_command(name):
    lines = PRESETS[NAMES.index(name)].read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert (REPO / "experiments" / f"{entry(name)}.py").is_file()


# conf/mode/ presets -> the run's name (finetune-sync)
PRESET_NAMES = {"reload": "full-reload", "legacy": "full-legacy", "lora": "lora-reload", "shared": "full-shared",
                "broadcast": "full-broadcast"}


@pytest.mark.parametrize("name", NAMES)
def test_every_grid_point_composes(name, bench_schema):
    bench_schema(name)
    points = grid(name)
    assert len(points) >= 2
    for overrides in points:
        cfg = bench_cfg(f"bench={name}", *overrides)
        assert cfg.bench.name == name
        tiny = cfg.model.tiny
        assert tiny.hidden_size // tiny.num_attention_heads >= 64  # vLLM's CPU attention
        for override in overrides:
            key, value = override.split("=")
            if key == "mode":  # a preset of finetune + sync
                assert cfg.name == PRESET_NAMES[value]
            else:
                assert str(OmegaConf.select(cfg, key)) == value


def test_sync_preset_scales_width(bench_schema):
    bench_schema("sync_latency")
    tiny = bench_cfg("bench=sync_latency", "model.tiny.hidden_size=512").model.tiny
    assert (tiny.intermediate_size, tiny.num_attention_heads, tiny.num_key_value_heads) == (1024, 8, 8)


def test_step_time_sizes(bench_schema):
    """toy / ~28M / ~85M as issue 12 measured them; vLLM's KV cache is the hardware's (on CPU a
    size in GiB, hardware.kv_cache_gb, whatever the model's size)."""
    bench_schema("step_time")
    shapes = {}
    for size in ("toy", "28m", "85m"):
        cfg = bench_cfg("bench=step_time", f"bench.size={size}")
        t = cfg.model.tiny
        shapes[size] = (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
                        t.intermediate_size, cfg.hardware.kv_cache_gb)
    assert shapes == {"toy": (128, 2, 2, 2, 256, 2), "28m": (512, 8, 8, 8, 1536, 2), "85m": (768, 12, 12, 12, 2048, 2)}
    assert bench_cfg("bench=step_time", "bench.size=85m", "hardware.kv_cache_gb=4").hardware.kv_cache_gb == 4


def test_step_scaling_points_are_trainer_procs_by_tp_by_dp(bench_schema):
    """Every layout once, on the step_time preset's toy model and workload, ours alone."""
    bench_schema("step_scaling")
    points = grid("step_scaling")
    layouts = []
    for overrides in points:
        cfg = bench_cfg("bench=step_scaling", *overrides)
        hw = cfg.hardware
        layouts.append((hw.trainer_procs, hw.vllm_tp, hw.vllm_dp))
        assert (cfg.bench.name, cfg.bench.trl, cfg.bench.size, cfg.model.tiny.hidden_size) == ("step_scaling", False, "toy", 128)
        assert (cfg.train.prompts_per_step, cfg.train.group_size, cfg.rollout.max_tokens) == (8, 8, 64)
    assert sorted(layouts) == list(itertools.product([1, 2], [1, 2], [1, 2]))
    # The other sizes compose too (a sweep's bench.size=28m on the command line replaces the preset's).
    assert bench_cfg("bench=step_scaling", "bench.size=28m").model.tiny.hidden_size == 512


def test_bench_typo_fails_at_start(bench_schema):
    bench_schema("rollout_throughput")
    with pytest.raises(Exception, match="repeatz"):
        bench_cfg("bench=rollout_throughput", "bench.repeatz=2")


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("name", NAMES)
def test_every_preset_runs_briefly(name, attach, tmp_path, bench_schema):
    """The first grid point, one repeat, on the session's vLLM server: good rows and a plot."""
    if name == "time_to_accuracy":
        pytest.skip("serves its own model (model=tiny_arith), not the session's: tests/experiments/test_time_to_accuracy.py")
    bench_schema(name)  # grid() composes the preset, in this process
    cli("-m", f"experiments.{entry(name)}", "-m", f"bench={name}", *grid(name)[0], attach, *QUIET,
        "bench.repeats=1", "train.prompts_per_step=2", f"hydra.sweep.dir={tmp_path}")
    rows = pd.read_csv(tmp_path / f"{name}.csv")
    # One row per grid point; the step-time benchmark writes one per side (ours, TRL).
    assert len(rows) == (2 if name == "step_time" else 1) and rows["error"].isna().all(), rows.to_dict("records")
    metric = {"rollout_throughput": "vllm_tokens_per_s", "sync_latency": "sync_ms", "step_time": "step_s",
              "step_scaling": "step_s"}[name]
    assert (rows[metric] > 0).all()
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
