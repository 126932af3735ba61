"""The step-time benchmark: a real toy run of both sides (ours on the session's vLLM server, TRL's
GRPOTrainer), and the message when TRL is not installed."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from bench_cli import QUIET, cli
from conftest import REPO

P, G, T = 2, 4, 8  # prompts per step, group size, tokens per completion


@pytest.mark.slow
def test_both_sides_time_the_same_work(attach, tmp_path):
    cli("-m", "experiments.step_time", "-m", "experiment=step_time", "bench.size=toy", attach, *QUIET,
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
    assert ours["params_m"] == trl["params_m"] and ours["threads"] == trl["threads"] and trl["dtype"] == "float32"
    assert rows["ratio"].tolist() == pytest.approx([trl["step_s"] / ours["step_s"]] * 2)
    # TRL ran while our vLLM server was idle: it waited for the spin to stop, then the server used ~no CPU.
    assert trl["server_busy"] < 0.25 and trl["quiet_wait_s"] > 0
    assert (tmp_path / "step_time.png").stat().st_size > 10_000


def test_missing_trl_fails_at_start_naming_the_extra(tmp_path):
    """`sys.modules["trl"] = None` is how Python itself reports a package as absent on import."""
    code = ("import runpy, sys; sys.modules['trl'] = None; "
            f"sys.argv = ['step_time', 'experiment=step_time', 'hydra.run.dir={tmp_path}']; "
            "runpy.run_module('experiments.step_time', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert 'pip install -e ".[bench]"' in proc.stderr + proc.stdout
    assert not (tmp_path / "vllm.log").exists()  # failed before starting anything
