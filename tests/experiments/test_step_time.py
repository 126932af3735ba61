"""The step-time benchmark: a real toy run of both sides (ours on the session's vLLM server, TRL's
GRPOTrainer), ours on two trainer processes, the plot of a trainer-processes x TP x DP sweep, and
the message when TRL is not installed."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench_cli import QUIET, cli
from conftest import REPO, make_cfg, restore_pristine
from runtime.csvlog import append_row
from experiments.plot import plot_step_time
from runtime.config import register_configs
from runtime.records import read_jsonl

P, G, T = 2, 4, 8  # prompts per step, group size, tokens per completion


@pytest.mark.slow
def test_both_sides_time_the_same_work(attach, tmp_path):
    cli("-m", "experiments.step_time", "-m", "bench=step_time", "bench.size=toy", attach, *QUIET,
        "bench.warmup=2", "bench.repeats=3", f"train.prompts_per_step={P}", f"train.group_size={G}",
        f"rollout.max_tokens={T}", f"hydra.sweep.dir={tmp_path}")
    rows = pd.read_csv(tmp_path / "step_time.csv").set_index("side")
    assert list(rows.index) == ["ours", "trl"] and rows["error"].isna().all(), rows["error"].tolist()
    ours, trl = rows.loc["ours"], rows.loc["trl"]
    for side in (ours, trl):
        assert side["timed_steps"] == 3
        assert side["tokens"] == P * G * T  # every completion ran to max_tokens on both sides
        assert side["step_s"] > 0 and side["generate_s"] > 0 and side["train_s"] > 0 and side["score_s"] >= 0
        assert side["gen_tokens_per_s"] > side["step_tokens_per_s"] > 0
    assert ours["sync_s"] > 0 and trl["sync_s"] == 0  # TRL moves no weights
    # Our train phase re-timed with vLLM idle: the server used no core meanwhile (a spinning worker
    # reads ~1; a napping one up to ~0.15 on a loaded machine).
    assert ours["train_alone_s"] > 0 and ours["alone_server_busy"] < 0.25
    assert ours["train_ratio"] == pytest.approx(ours["train_s"] / ours["train_alone_s"])
    assert ours["params_m"] == trl["params_m"] and ours["threads"] == trl["threads"]
    # The session server serves fp32, whatever this CPU's default; TRL computes in what our trainer does.
    assert ours["dtype"] == "float32" and trl["compute_dtype"] == ours["compute_dtype"]
    # Each row names the machine and each side's precision (issue 29): README's rows per CPU kind.
    from grpo.precision import cpu_bf16_native
    from runtime.cpuinfo import cpu_kind
    assert (rows["cpu"] == cpu_kind()).all() and (rows["cpu_bf16_native"] == cpu_bf16_native()).all()
    assert ours["master_dtype"] == trl["master_dtype"] == "float32"
    assert ours["compute_dtype"] == ("bfloat16" if cpu_bf16_native() else "float32")  # hardware=cpu: autocast=auto
    assert not ours["compiled"]  # compile=auto: a 5-step toy run never repays compiling
    assert rows["ratio"].tolist() == pytest.approx([trl["step_s"] / ours["step_s"]] * 2)
    # TRL ran while our vLLM server was idle: it waited for the spin to stop, then the server used ~no CPU.
    assert trl["server_busy"] < 0.25 and trl["quiet_wait_s"] > 0
    assert (tmp_path / "step_time.png").stat().st_size > 10_000


def test_missing_trl_fails_at_start_naming_the_extra(tmp_path):
    """`sys.modules["trl"] = None` is how Python itself reports a package as absent on import."""
    code = ("import runpy, sys; sys.modules['trl'] = None; "
            f"sys.argv = ['step_time', 'bench=step_time', 'hydra.run.dir={tmp_path}']; "
            "runpy.run_module('experiments.step_time', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert 'pip install -e ".[bench]"' in proc.stderr + proc.stdout
    assert not (tmp_path / "vllm.log").exists()  # failed before starting anything


@pytest.fixture
def step_time():
    """The entry module (importing it makes its bench schema the root); the training schema after."""
    yield importlib.import_module("experiments.step_time")
    register_configs()


def test_trainer_procs_from_config_or_torchrun(step_time, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert step_time.trainer_procs(make_cfg()) == 1
    assert step_time.trainer_procs(make_cfg("hardware.trainer_procs=2")) == 2  # more than started: launched
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun --nproc_per_node=2
    assert step_time.trainer_procs(make_cfg()) == 2
    assert step_time.trainer_procs(make_cfg("hardware.trainer_procs=2")) == 2
    with pytest.raises(ValueError, match="hardware.trainer_procs=4, but torchrun started 2 processes"):
        step_time.trainer_procs(make_cfg("hardware.trainer_procs=4"))


def test_scaling_plot_has_a_bar_per_layout_and_marks_the_failed_one(tmp_path):
    path = tmp_path / "step_scaling.csv"
    base = {"size": "toy", "max_tokens": 64, "dtype": "float32", "side": "ours"}
    for procs, tp, step in [(2, 1, 1.5), (1, 1, 1.0)]:
        append_row(path, {**base, "trainer_procs": procs, "tp": tp, "dp": 1, "params_m": 0.46, "step_s": step,
                          "generate_s": 0.4, "score_s": 0.01, "train_s": step - 0.5, "sync_s": 0.09, "error": ""})
    append_row(path, {**base, "trainer_procs": 1, "tp": 2, "dp": 1, "error": "VLLMStartError: no NUMA node"})
    fig = plot_step_time(pd.read_csv(path))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ours\n1p tp1 dp1", "ours\n1p tp2 dp1", "ours\n2p tp1 dp1"]
    assert [t.get_text() for t in ax.texts] == ["failed\n(see error)"]
    tops = sorted({round(line.get_ydata()[0], 6) for line in ax.lines})  # the black step-time lines
    assert tops == [1.0, 1.5]


@pytest.mark.slow
@pytest.mark.heavy
def test_ours_on_two_trainer_processes(attach, vllm_server, tiny_model_path, tmp_path):
    """bench=step_scaling at 2 trainer processes: the job runs the point under torchrun and
    appends the row rank 0 wrote; 1 warm-up + 1 timed step, attached to the session server."""
    cli("-m", "experiments.step_time", "-m", "bench=step_scaling", "hardware.trainer_procs=2",
        "hardware.vllm_tp=1", "hardware.vllm_dp=1", attach, *QUIET, "bench.warmup=1", "bench.repeats=1",
        f"train.prompts_per_step={P}", f"train.group_size={G}", f"rollout.max_tokens={T}", f"hydra.sweep.dir={tmp_path}")
    restore_pristine(vllm_server, tiny_model_path)
    rows = pd.read_csv(tmp_path / "step_scaling.csv")
    assert len(rows) == 1 and rows["error"].isna().all(), rows.to_dict("records")
    row = rows.iloc[0]
    assert (row["side"], row["trainer_procs"], row["tp"], row["dp"], row["timed_steps"]) == ("ours", 2, 1, 1, 1)
    assert row["tokens"] == P * G * T and "ratio" not in rows  # every completion ran to max_tokens; no TRL
    assert row["step_s"] > row["train_s"] > 0 and row["generate_s"] > 0 and row["sync_s"] > 0 and row["train_alone_s"] > 0
    assert row["threads"] == int(os.environ.get("OMP_NUM_THREADS", "1"))  # torchrun's default per process
    run_dir = Path(row["run_dir"])
    assert run_dir.name == "torchrun" and run_dir.parent.parent == tmp_path
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]  # written once, by rank 0
    syncs = read_jsonl(run_dir / "sync.jsonl")
    assert len(syncs) >= 2 and all(s["probe_max_diff"] <= 1e-3 for s in syncs)
    assert (tmp_path / "step_scaling.png").stat().st_size > 10_000
