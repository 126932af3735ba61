"""Plots of sweep CSVs (failed rows included) and the readers the notebooks use."""

from __future__ import annotations

import json
import os
import re
import time

import pandas as pd
import pytest

from experiments import outputs
from runtime import records
from runtime.csvlog import append_row
from experiments.plot import main, ok_rows, plot_csv


@pytest.fixture
def rollout_csv(tmp_path):
    path = tmp_path / "rollout_throughput.csv"
    for tp, dp, tps in [(1, 1, 900.0), (1, 2, 1500.0), (2, 1, 1100.0)]:
        for g in (4, 16):
            append_row(path, {"tp": tp, "dp": dp, "group_size": g, "max_tokens": 32, "vllm_tokens_per_s": tps * g / 4,
                              "hf_tokens_per_s": 100.0, "speedup": tps * g / 400, "error": ""})
    append_row(path, {"tp": 2, "dp": 2, "group_size": 4, "max_tokens": 32, "error": "AssertionError: no NUMA node"})
    return path


def test_rollout_plot_from_csv_with_a_failed_point(rollout_csv):
    df = pd.read_csv(rollout_csv)
    assert len(df) == 7 and len(ok_rows(df)) == 6
    png = plot_csv(rollout_csv)
    assert png == rollout_csv.with_suffix(".png") and png.stat().st_size > 10_000


def test_sync_plot_and_cli_over_a_dir(tmp_path, rollout_csv, capsys):
    sync = tmp_path / "sync_latency.csv"
    for mode, base in [("reload", 20.0), ("legacy", 30_000.0)]:
        for h, params in [(128, 0.5), (256, 1.3)]:
            append_row(sync, {"mode": mode, "hidden_size": h, "params_m": params, "sync_ms": base * params,
                              "sync_ms_min": base * params * 0.9, "sync_ms_max": base * params * 1.2, "error": ""})
    main([str(tmp_path)])
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(p) for p in [sync.with_suffix(".png"), rollout_csv.with_suffix(".png")])


def test_read_jsonl_turns_logged_nan_back_into_floats(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"step": 1, "kl": 0.5, "note": "a"}, {"step": 2, "kl": "nan", "note": "b"}]))
    df = records.read_table(path)
    assert df["kl"].dtype == float and df["kl"].iloc[0] == 0.5 and df["kl"].isna().iloc[1]
    assert list(df["note"]) == ["a", "b"]
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing.jsonl'}: no such file"):
        records.read_table(tmp_path / "missing.jsonl")
    assert records.read_table(tmp_path / "eval.jsonl", optional=True).empty  # a run without eval


def test_typed_paths_start_from_where_they_were_typed(tmp_path, monkeypatch):
    """`outputs/x` typed in `home` is home/outputs/x from any cwd given `base` (a notebook's
    kernel runs in notebooks/); a path naming nothing, or no run/sweep, is an error naming it."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    run, sweep = home / "outputs" / "x", home / "multirun" / "s"
    for folder in (run, sweep, elsewhere):
        folder.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (sweep / "summary.csv").write_text("job\n0\n")
    monkeypatch.chdir(elsewhere)
    assert outputs.run_dir("outputs/x", base=home) == run and outputs.sweep_dir("multirun/s", base=home) == sweep
    assert outputs.run_dir(None, base=home) == run and outputs.sweep_dir(None, base=home) == sweep  # the newest
    monkeypatch.chdir(home)
    assert outputs.run_dir("outputs/x") == run and outputs.run_dir(str(run), base=elsewhere) == run
    monkeypatch.chdir(elsewhere)
    with pytest.raises(FileNotFoundError, match=re.escape(f"outputs/x: no such file or directory ({elsewhere}/outputs/x)")):
        outputs.run_dir("outputs/x")
    with pytest.raises(FileNotFoundError, match=re.escape(f"multirun/s: not a sweep dir, it holds no *.csv ({home}/multirun/s)")):
        (sweep / "summary.csv").unlink()
        outputs.sweep_dir("multirun/s", base=home)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{home}: not a run dir, it holds no metrics.jsonl")):
        outputs.run_dir(str(home))
    monkeypatch.setenv("PWD", str(home))
    assert outputs.shell_dir() == home
    monkeypatch.delenv("PWD")
    assert outputs.shell_dir() == elsewhere


def test_newest_dir_is_the_default(tmp_path):
    old, new = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for i, folder in enumerate([old, new]):
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text("{}\n")
        os.utime(folder / "metrics.jsonl", (time.time() - 100 + i, time.time() - 100 + i))
    assert outputs.newest_parent(tmp_path, "metrics.jsonl") == new
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        outputs.newest_parent(tmp_path, "nothing.csv")


def test_step_time_plot_with_a_failed_side(tmp_path):
    path = tmp_path / "step_time.csv"
    for size, params, ours_s, trl_s in [("toy", 0.46, 0.5, 0.4), ("28m", 27.8, 6.0, 8.0)]:
        for side, step in [("ours", ours_s), ("trl", trl_s)]:
            append_row(path, {"size": size, "params_m": params, "max_tokens": 64, "dtype": "float32", "side": side,
                              "step_s": step, "generate_s": step / 2, "score_s": 0.01, "train_s": step / 3,
                              "sync_s": step / 10 if side == "ours" else 0.0, "ratio": trl_s / ours_s, "error": ""})
    append_row(path, {"size": "85m", "params_m": 85.7, "max_tokens": 64, "dtype": "float32", "side": "ours",
                      "error": "VLLMStartError: raise hardware.gpu_memory_utilization"})
    png = plot_csv(path)
    assert png == path.with_suffix(".png") and png.stat().st_size > 10_000
