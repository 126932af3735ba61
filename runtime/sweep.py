"""A training sweep compared at a glance: `<sweep dir>/summary.csv`, one row per job.

    python train.py -m mode=reload,lora train.seed=0,1

Each job appends its row as it ends (`on_job_end` runs in the job's own process, so parallel
launchers append under runtime/csvlog.py's lock). A job that raised still gets its row
(`status` failed, its `error`, whatever it logged before), and Hydra stops the sweep only after
the batch, so no other job loses its row. A row holds one column per override key (`mode`,
`train.seed`, ...) and what the job's files say (`job_row`); notebooks/sweep_analysis.ipynb
overlays the jobs' curves grouped by any override (`group_curves`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from runtime.csvlog import append_row
from runtime.records import read_table
from runtime import distributed

SUMMARY = "summary.csv"
EVAL_METRIC = "eval/pass@1"  # greedy pass@1, the headline of eval.jsonl (lab/evaluate.py)
SEED = "train.seed"
# The columns a row has besides its overrides (and `final_<metric>`, `best_<metric>`).
FIELDS = ("job", "status", "steps", "final_reward", "best_eval_step", "step_s", "sync_ms", "error", "run_dir")


def override_columns(overrides: Sequence[str]) -> dict[str, Any]:
    """`["mode=lora", "+train.seed=1"]` -> `{"mode": "lora", "train.seed": 1}`, parsed as Hydra does."""
    columns = {}
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group + (f"@{o.package}" if o.package else "")
        columns[key] = "deleted" if o.is_delete() else o.value()
    return columns


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    """A numeric column without its NaN cells; empty when the file or the column is absent."""
    return pd.to_numeric(df[name], errors="coerce").dropna() if name in df else pd.Series(dtype=float)


def job_row(run_dir: Path, metric: str = EVAL_METRIC, last: int = 5) -> dict[str, Any]:
    """What a job's files say: the last step done, `final_reward` (mean reward of the last `last`
    steps, as train.py's return value), the final and best `metric` of eval.jsonl (NaN without
    one), mean step seconds (sum of the `time_*` phases) and mean sync ms (sync.jsonl)."""
    run_dir = Path(run_dir)  # a job that failed early may have written none of these
    metrics = read_table(run_dir / "metrics.jsonl", optional=True)
    evals = read_table(run_dir / "eval.jsonl", optional=True)
    syncs = read_table(run_dir / "sync.jsonl", optional=True)
    rewards, scores, steps = _column(metrics, "reward_mean"), _column(evals, metric), _column(metrics, "step")
    phases = metrics.filter(regex="^time_").apply(pd.to_numeric, errors="coerce")
    return {
        "steps": int(steps.max()) if len(steps) else 0,
        "final_reward": rewards.iloc[-last:].mean() if len(rewards) else math.nan,
        f"final_{metric}": scores.iloc[-1] if len(scores) else math.nan,
        f"best_{metric}": scores.max() if len(scores) else math.nan,
        "best_eval_step": int(evals.loc[scores.idxmax(), "step"]) if len(scores) else math.nan,
        "step_s": phases.sum(axis=1).mean() if len(phases.columns) else math.nan,
        "sync_ms": _column(syncs, "ms").mean() if len(syncs) else math.nan,
    }


class SweepSummary(Callback):
    """Hydra callback (conf/config.yaml `hydra.callbacks.summary`): in a multirun of `task`
    (Hydra's job name: `train` for train.py; the experiments' sweeps write their own CSVs), every
    job's row in `<sweep dir>/summary.csv`."""

    def __init__(self, task: str = "train", metric: str = EVAL_METRIC, last: int = 5):
        self.task, self.metric, self.last = task, metric, last

    def _ours(self, config: DictConfig) -> bool:
        return config.hydra.mode == RunMode.MULTIRUN and config.hydra.job.name == self.task and distributed.launch_rank() == 0

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # A summary holds one sweep's jobs: a sweep dir reused on purpose gets a new one (its
        # job dirs are overwritten by the new jobs of the same numbers anyway).
        if self._ours(config):
            (Path(config.hydra.sweep.dir) / SUMMARY).unlink(missing_ok=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        if not self._ours(config):
            return
        # Both absolute (a job that chdir'ed into its dir is still there when this runs).
        sweep_dir = Path(config.hydra.runtime.cwd, config.hydra.sweep.dir)
        run_dir = Path(config.hydra.runtime.output_dir)
        failed = job_return.status != JobStatus.COMPLETED
        error = job_return._return_value if failed else None  # `return_value` re-raises a failure
        row = {
            **override_columns(job_return.overrides or []),
            "job": config.hydra.job.num,
            "status": "completed" if not failed else "failed",
            **job_row(run_dir, self.metric, self.last),
            "error": f"{type(error).__name__}: {error}".splitlines()[0][:300] if failed else "",
            # Relative inside the sweep dir, so a sweep dir moved elsewhere still reads.
            "run_dir": str(run_dir.relative_to(sweep_dir)) if run_dir.is_relative_to(sweep_dir) else str(run_dir),
        }
        append_row(sweep_dir / SUMMARY, row)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self._ours(config):
            print(f"summary: {Path(config.hydra.sweep.dir) / SUMMARY}")


def read_summary(sweep_dir: Path) -> pd.DataFrame:
    """summary.csv with `run_dir` made a path (relative ones are inside the sweep dir)."""
    summary = pd.read_csv(Path(sweep_dir) / SUMMARY, dtype={"run_dir": str, "error": str})
    return summary.assign(run_dir=[Path(sweep_dir) / d for d in summary["run_dir"]]).sort_values("job")


def override_keys(summary: pd.DataFrame) -> list[str]:
    """The override columns of a summary: those the callback does not write itself."""
    return [c for c in summary.columns if c not in FIELDS and not c.startswith(("final_", "best_"))]


def varying(summary: pd.DataFrame, exclude: Sequence[str] = (SEED,)) -> list[str]:
    """Override keys whose value differs between jobs: what a sweep compares (the seed aside)."""
    return [k for k in override_keys(summary) if k not in exclude and summary[k].nunique(dropna=False) > 1]


def group_curves(summary: pd.DataFrame, file: str, column: str, by: Optional[str] = None,
                 spread: str = "minmax") -> pd.DataFrame:
    """`column` of each completed job's `file` (e.g. metrics.jsonl `reward_mean`) against step,
    over the jobs that share a value of override `by` (all jobs when None): one row per (group,
    step) with `mean`, `lo`/`hi` (min/max over the jobs, or mean ∓ std with `spread="std"`) and
    `n`, the number of jobs at that step."""
    if spread not in ("minmax", "std"):
        raise ValueError(f"spread={spread!r}: must be 'minmax' or 'std'")
    frames = []
    for _, job in summary[summary["status"] == "completed"].iterrows():
        df = read_table(Path(job["run_dir"]) / file, optional=True)  # eval.jsonl: not in a run without eval
        if column in df:
            group = job[by] if by else "all"
            frames.append(df[["step", column]].dropna().assign(group=group))
    if not frames:
        return pd.DataFrame(columns=["group", "step", "mean", "lo", "hi", "n"])
    stats = pd.concat(frames).groupby(["group", "step"])[column].agg(["mean", "min", "max", "std", "count"])
    std = stats["std"].fillna(0.0)  # one job: no spread
    lo, hi = (stats["min"], stats["max"]) if spread == "minmax" else (stats["mean"] - std, stats["mean"] + std)
    return pd.DataFrame({"mean": stats["mean"], "lo": lo, "hi": hi, "n": stats["count"]}).reset_index()
