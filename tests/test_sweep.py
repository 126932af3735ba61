"""The sweep summary on a real Hydra multirun of a small app that writes a run's files (train.py's
own 2-job sweep runs in tests/experiments/test_notebooks.py): one row per job, a
failed job's row among the others, NaN where a job has no eval.jsonl, curves grouped by override."""

from __future__ import annotations

import math
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO
from runtime.sweep import SUMMARY, group_curves, override_columns, override_keys, read_summary, varying

APP = '''
import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(config_path=".", config_name="app", version_base="1.3")
def main(cfg):
    if cfg.seed == 2:
        raise RuntimeError("diverged at step 0")
    run_dir = Path(HydraConfig.get().runtime.output_dir)

    def write(name, rows):  # the line format of runtime/logger.py (metrics, sync) and lab/evaluate.py (eval)
        (run_dir / name).write_text("".join(json.dumps(row) + "\\n" for row in rows))

    write("metrics.jsonl", [{"step": step, "reward_mean": cfg.seed + step / 10, "loss": 0.0, "time_generate": 0.5,
                             "time_train": 0.25, "time_sync": 0.125} for step in range(1, 7)])
    write("sync.jsonl", [{"step": step, "mode": "reload", "ms": 10.0 * step} for step in (2, 4, 6)])
    if cfg.seed == 0:  # seed 1 has no eval.jsonl
        write("eval.jsonl", [{"step": 0, "eval/pass@1": 0.2}, {"step": 3, "eval/pass@1": 0.5},
                             {"step": 6, "eval/pass@1": 0.4}])


if __name__ == "__main__":
    main()
'''

CONFIG = """
seed: 0
lr: 0.1
hydra:
  callbacks:
    summary: {_target_: runtime.sweep.SweepSummary, task: app}
"""


def app(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "app.yaml").write_text(CONFIG)
    return subprocess.run([sys.executable, "app.py", *args], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", **env}, timeout=300)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app")
    proc = app(folder, "-m", "seed=0,1,2", "lr=0.5", "hydra.sweep.dir=sweep")
    assert proc.returncode != 0 and "diverged at step 0" in proc.stderr  # Hydra re-raises after the batch
    assert "Callback" not in proc.stderr  # Hydra turns a callback's exception into a warning
    return folder / "sweep"


def test_one_row_per_job_failed_one_included(sweep):
    summary = read_summary(sweep)
    assert summary["job"].tolist() == [0, 1, 2]
    assert summary["seed"].tolist() == [0, 1, 2] and (summary["lr"] == 0.5).all()
    assert override_keys(summary) == ["seed", "lr"] and varying(summary) == ["seed"]
    assert summary["status"].tolist() == ["completed", "completed", "failed"]
    assert summary["error"].fillna("").tolist() == ["", "", "RuntimeError: diverged at step 0"]
    done = summary.iloc[:2]
    assert done["steps"].tolist() == [6, 6]
    assert done["final_reward"].tolist() == pytest.approx([0.4, 1.4])  # mean of steps 2..6
    assert done["step_s"].tolist() == pytest.approx([0.875, 0.875])
    assert done["sync_ms"].tolist() == pytest.approx([40.0, 40.0])
    assert [p.name for p in summary["run_dir"]] == ["0", "1", "2"] and summary["run_dir"].iloc[0].is_dir()
    # Eval: last and best line of seed 0's eval.jsonl; NaN for seed 1 (none) and the failed job.
    assert summary["final_eval/pass@1"].iloc[0] == 0.4 and summary["best_eval/pass@1"].iloc[0] == 0.5
    assert summary["best_eval_step"].iloc[0] == 3
    assert summary[["final_eval/pass@1", "best_eval/pass@1"]].iloc[1:].isna().all().all()
    failed = summary.iloc[2]
    assert failed["steps"] == 0 and math.isnan(failed["final_reward"]) and math.isnan(failed["step_s"])


def test_curves_mean_and_spread_over_jobs(sweep):
    summary = read_summary(sweep)
    pooled = group_curves(summary, "metrics.jsonl", "reward_mean")  # the two completed jobs
    assert pooled["step"].tolist() == list(range(1, 7)) and (pooled["n"] == 2).all()
    assert pooled["mean"].tolist() == pytest.approx([0.5 + s / 10 for s in range(1, 7)])
    assert (pooled["hi"] - pooled["lo"]).tolist() == pytest.approx([1.0] * 6)
    std = group_curves(summary, "metrics.jsonl", "reward_mean", spread="std")
    assert (std["hi"] - std["mean"]).tolist() == pytest.approx([2 ** -0.5] * 6)
    by_seed = group_curves(summary, "metrics.jsonl", "reward_mean", by="seed")
    assert sorted(set(by_seed["group"])) == [0, 1] and (by_seed["lo"] == by_seed["hi"]).all()
    evals = group_curves(summary, "eval.jsonl", "eval/pass@1", by="lr")
    assert evals["step"].tolist() == [0, 3, 6] and evals["mean"].tolist() == [0.2, 0.5, 0.4]
    assert group_curves(summary, "eval.jsonl", "eval/missing").empty
    with pytest.raises(ValueError, match="spread"):
        group_curves(summary, "metrics.jsonl", "reward_mean", spread="iqr")


def test_only_a_multirun_of_the_task_on_rank_0_writes_a_summary_and_a_new_one_replaces_it(sweep):
    folder = sweep.parent
    assert app(folder, "-m", "seed=1", "hydra.sweep.dir=sweep").returncode == 0
    assert pd.read_csv(sweep / SUMMARY)["seed"].tolist() == [1]
    assert app(folder, "seed=1", "hydra.run.dir=single").returncode == 0
    assert (folder / "single" / "metrics.jsonl").exists() and not list(folder.glob("single/*.csv"))
    # Another task's multirun (the experiments' sweeps) is not summarised.
    assert app(folder, "-m", "seed=1", "hydra.sweep.dir=other", "hydra.callbacks.summary.task=train").returncode == 0
    assert (folder / "other" / "0" / "metrics.jsonl").exists() and not (folder / "other" / SUMMARY).exists()
    # A job run as several processes: only rank 0 writes its row (torchrun's RANK, or submitit's
    # task rank in a job that failed before train.py exported RANK).
    assert app(folder, "-m", "seed=1", "hydra.sweep.dir=rank1", RANK="1").returncode == 0
    assert (folder / "rank1" / "0" / "metrics.jsonl").exists() and not (folder / "rank1" / SUMMARY).exists()
    task1 = app(folder, "-m", "seed=2", "hydra.sweep.dir=task1", SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_GLOBALID="1")
    assert task1.returncode != 0 and "Callback" not in task1.stderr
    assert (folder / "task1" / "0").is_dir() and not (folder / "task1" / SUMMARY).exists()


def test_override_columns_parse_as_hydra_does():
    assert override_columns(["mode=lora", "+train.seed=1", "server.base_url=http://127.0.0.1:8000", "~x",
                             "model@policy=tiny", "lr=1e-3"]) == {
        "mode": "lora", "train.seed": 1, "server.base_url": "http://127.0.0.1:8000", "x": "deleted",
        "model@policy": "tiny", "lr": 1e-3}
