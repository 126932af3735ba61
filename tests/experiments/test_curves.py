"""experiments/curves.py: pass@1 curves from run dirs alone (eval.jsonl, metrics.jsonl, the saved
config), the seconds being the steps' wall time before each eval, and the time to a target."""

from __future__ import annotations

import json

import pandas as pd
from omegaconf import OmegaConf

from experiments.curves import eval_curve, sweep_curves, time_to_target, write


def fake_run(folder, name: str, seed: int, passes: list[float], step_s: float):
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"name": name, "train": {"seed": seed}}), folder / ".hydra" / "config.yaml")
    steps = [{"step": s, "time_step": step_s, "time_generate": step_s / 2, "time_train": step_s / 2} for s in range(1, 5)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in steps))
    evals = [{"step": s, "eval/pass@1": p} for s, p in zip((0, 2, 4), passes)]
    (folder / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))


def test_curves_from_run_dirs_and_time_to_target(tmp_path):
    fake_run(tmp_path / "0-full-reload", "full-reload", 0, [0.3, 0.5, 0.7], 1.0)
    fake_run(tmp_path / "1-full-reload", "full-reload", 1, [0.3, 0.4, 0.5], 2.0)
    (tmp_path / "not-a-run").mkdir()
    assert eval_curve(tmp_path / "0-full-reload")[1] | {} == {
        "step": 2, "seconds": 2.0, "pass@1": 0.5, "generate_s": 1.0, "score_s": 0.0, "train_s": 1.0, "sync_s": 0.0}
    df = sweep_curves(tmp_path)
    assert sorted(set(df["seed"])) == [0, 1] and set(df["side"]) == {"ours"} and len(df) == 6
    target = time_to_target(df, 0.5).set_index("seed")
    assert target.loc[0, "seconds"] == 2.0 and target.loc[1, "seconds"] == 8.0 and target.loc[1, "step"] == 4
    assert pd.isna(time_to_target(df, 0.9)["seconds"]).all()
    paths = write(df, tmp_path, "curves", 0.5)
    assert [p.name for p in paths] == ["curves.csv", "curves.png", "curves_target.csv"] and all(p.exists() for p in paths)
