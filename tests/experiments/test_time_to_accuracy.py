"""experiments/time_to_accuracy.py end to end, tiny: ours (train.py's run on its own vLLM) and TRL's
GRPOTrainer from the same cached warm start, evaluated at the same steps on the same held-out
prompts; one CSV row per eval per side, and the plot with the time-to-target table."""

from __future__ import annotations

import pandas as pd
import pytest

from bench_cli import QUIET, cli


@pytest.mark.slow
@pytest.mark.heavy
def test_time_to_accuracy_runs_both_sides_briefly(tmp_path):
    cli("-m", "experiments.time_to_accuracy", "-m", "bench=time_to_accuracy", "train.seed=0", *QUIET,
        "train.steps=2", "eval.every=1", "eval.num_prompts=16", "train.prompts_per_step=4",
        f"hydra.sweep.dir={tmp_path}")
    rows = pd.read_csv(tmp_path / "time_to_accuracy.csv")
    assert rows["error"].isna().all(), rows.to_dict("records")
    for side in ("ours", "trl"):
        mine = rows[rows["side"] == side]
        assert list(mine["step"]) == [0, 1, 2] and (mine["seconds"].diff().dropna() > 0).all()
        assert mine["pass@1"].between(0, 1).all()
    # the same warm start on the same prompts: at step 0 both read (nearly) the same greedy answers
    start = rows[rows["step"] == 0].set_index("side")["pass@1"]
    assert abs(start["ours"] - start["trl"]) <= 2 / 16
    assert (tmp_path / "time_to_accuracy.png").stat().st_size > 10_000
    assert (tmp_path / "time_to_accuracy_target.csv").exists()
