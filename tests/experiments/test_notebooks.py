"""CI executes the analysis notebooks (nbclient) on a real short run, a real small benchmark sweep
and a real 2-job training sweep made here, and fails if any cell fails or a plot is not written."""

from __future__ import annotations

import re
import subprocess
import sys

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from bench_cli import QUIET, cli
from conftest import REPO, SEEDED, make_cfg
from envs.serve import served
from lab.loop import train
from runtime.records import read_table
from runtime.sweep import EVAL_METRIC, read_summary

pytestmark = pytest.mark.slow


def execute(name: str) -> None:
    book = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    # From notebooks/, as a user opens it; the kernel inherits RUN_DIR / SWEEP_DIR from us.
    NotebookClient(book, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()


@pytest.fixture(scope="module")
def run_dir(vllm_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "run"
    cli("train.py", "train.steps=4", "log.samples_every=2", *QUIET, f"server.base_url={vllm_server.base_url}",
        f"hydra.run.dir={folder}")
    return folder


@pytest.fixture(scope="module")
def sweep_dir(vllm_server, tmp_path_factory):
    """Throughput on 4 grid points with its own servers (TP 1 and 2; each reused for a second
    workload), and sync latency on the session server, into one sweep dir."""
    folder = tmp_path_factory.mktemp("sweep")
    cli("-m", "experiments.rollout_throughput", "-m", "bench=rollout_throughput", "hardware.vllm_tp=1,2",
        "hardware.vllm_dp=1", "train.group_size=2,4", "rollout.max_tokens=16", "train.prompts_per_step=4",
        "bench.repeats=2", f"hydra.sweep.dir={folder}")
    cli("-m", "experiments.sync_latency", "-m", "bench=sync_latency", "mode=reload",
        "model.tiny.hidden_size=128", "bench.repeats=2", f"server.base_url={vllm_server.base_url}",
        f"hydra.sweep.dir={folder}")
    return folder


@pytest.mark.heavy  # the benchmark sweep starts 2 servers; CI runs the notebook on a train.py sweep
def test_sweep_rows(sweep_dir):
    roll = pd.read_csv(sweep_dir / "rollout_throughput.csv")
    assert list(zip(roll["tp"], roll["group_size"])) == [(1, 2), (1, 4), (2, 2), (2, 4)]
    assert list(roll["server_reused"]) == [False, True, False, True]
    tp1 = roll[roll["tp"] == 1]
    assert tp1["error"].isna().all(), tp1["error"].tolist()
    # Token counts are real: at most prompts x group x max_tokens, and most completions run long.
    assert (tp1["vllm_tokens"] <= 4 * tp1["group_size"] * 16).all() and (tp1["vllm_tokens"] > 4 * tp1["group_size"] * 8).all()
    assert (tp1["speedup"] > 0).all() and (tp1["vllm_latency_ms"] > 0).all()
    # The HF baseline ran while the server it started was idle: a spinning vLLM worker reads ~1
    # core; ours naps in 5 ms steps for up to 1 s after a request (serving/quiet_worker.py), which
    # reads 0.01-0.15 cores on a loaded 2-core machine.
    assert (tp1["hf_server_busy"] < 0.25).all(), tp1["hf_server_busy"].tolist()
    sync = pd.read_csv(sweep_dir / "sync_latency.csv")
    assert sync["mode"].tolist() == ["full-reload"] and sync["error"].isna().all()
    assert 0 < sync["sync_ms_min"][0] <= sync["sync_ms"][0] <= sync["sync_ms_max"][0]
    assert sync["bytes"][0] > 0.9 * 4 * sync["params_m"][0] * 1e6  # fp32 safetensors
    for png in ("rollout_throughput.png", "sync_latency.png"):  # the sweeps' end-of-run plots
        assert (sweep_dir / png).stat().st_size > 10_000


def test_run_analysis_notebook(run_dir, monkeypatch):
    monkeypatch.setenv("RUN_DIR", str(run_dir))
    execute("run_analysis")
    for png in ("reward.png", "kl_logprob_gap.png", "time_split.png", "sync_ms.png"):
        assert (run_dir / png).stat().st_size > 10_000, png


def test_run_notebook_as_readme_types_it(run_dir):
    """README's command typed in a shell: RUN_DIR relative to where it is typed (the kernel runs
    in notebooks/). A RUN_DIR naming nothing stops it with an error naming it, not an empty table."""
    for png in run_dir.glob("*.png"):
        png.unlink()

    def typed(run: str) -> subprocess.CompletedProcess:
        command = 'cd "$0" && RUN_DIR="$1" "$2" -m jupyter execute "$3"'
        return subprocess.run(["bash", "-c", command, run_dir.parent, run, sys.executable,
                               REPO / "notebooks" / "run_analysis.ipynb"], capture_output=True, text=True, timeout=300)

    done = typed("run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "reward.png").stat().st_size > 10_000
    failed = typed("no_such_run")
    assert failed.returncode != 0
    traceback = re.sub(r"\x1b\[[0-9;]*m", "", failed.stderr)  # the kernel colours it
    assert f"FileNotFoundError: no_such_run: no such file or directory ({run_dir.parent / 'no_such_run'})" in traceback


@pytest.mark.heavy
def test_sweep_analysis_notebook(sweep_dir, monkeypatch):
    for png in sweep_dir.glob("*.png"):
        png.unlink()
    monkeypatch.setenv("SWEEP_DIR", str(sweep_dir))
    execute("sweep_analysis")
    for png in ("rollout_throughput.png", "sync_latency.png"):
        assert (sweep_dir / png).stat().st_size > 10_000, png


def test_train_sweep_summary_and_notebook(attach, tmp_path, monkeypatch):
    """`python train.py -m` over two seeds on the session server: summary.csv holds both jobs'
    real figures, and the notebook overlays their curves."""
    sweep = tmp_path / "sweep"
    cli("train.py", "-m", "train.seed=0,1", "train.steps=2", *QUIET, attach, f"hydra.sweep.dir={sweep}")
    summary = read_summary(sweep)
    assert summary["train.seed"].tolist() == [0, 1] and summary["status"].tolist() == ["completed"] * 2
    assert summary["steps"].tolist() == [2, 2] and (summary["step_s"] > 0).all() and (summary["sync_ms"] > 0).all()
    for _, job in summary.iterrows():  # the figures are the job's own files' (eval: NaN without eval.jsonl)
        metrics, evals = read_table(job["run_dir"] / "metrics.jsonl"), read_table(job["run_dir"] / "eval.jsonl", optional=True)
        assert 0 <= job["final_reward"] <= 1 and job["final_reward"] == pytest.approx(metrics["reward_mean"].mean())
        final_eval = job[f"final_{EVAL_METRIC}"]
        assert final_eval == pytest.approx(evals[EVAL_METRIC].iloc[-1]) if len(evals) else pd.isna(final_eval)
    monkeypatch.setenv("SWEEP_DIR", str(sweep))
    execute("sweep_analysis")
    assert (sweep / "sweep_curves.png").stat().st_size > 10_000


def test_several_env_services_feed_one_run_with_a_curve_per_env(attach, tmp_path, monkeypatch):
    """Each step logs a reward per env (`reward_env/<name>`); the run notebook draws one curve each."""
    with served("env=synthetic") as digits, served("env=reasoning_gym") as gym:
        history = train(make_cfg("mode=reload", attach, *SEEDED, "train.steps=3", "train.prompts_per_step=4",
                                 "env=remote", f"env.url=[{digits},{gym}]", "env.weights=[1,1]", "env.max_tokens=32",
                                 "eval.num_prompts=4"), tmp_path)
    seen = set()
    for m in history:
        assert {"reward/reward", "reward/solved"} <= m.keys()
        seen |= {k for k in m if k.startswith("reward_env/")}
        assert all(0.0 <= m[k] <= 1.0 for k in m if k.startswith("reward_env/"))
    assert seen == {"reward_env/synthetic", "reward_env/reasoning_gym"}
    monkeypatch.setenv("RUN_DIR", str(tmp_path))
    execute("run_analysis")
    assert (tmp_path / "reward_per_env.png").stat().st_size > 10_000
