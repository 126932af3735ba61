"""Several env services feed one run: each step logs a reward per env (`reward_env/<name>`), and
the run notebook draws one curve per env from them."""

from __future__ import annotations

import pytest

from conftest import SEEDED as RUN
from conftest import make_cfg
from envs.serve import served
from lab.loop import train
from test_notebooks import execute

pytestmark = pytest.mark.slow


def test_several_services_feed_one_run_with_a_curve_per_env(attach, tmp_path, monkeypatch):
    with served("env=synthetic") as digits, served("env=reasoning_gym") as gym:
        history = train(make_cfg("mode=reload", attach, *RUN, "train.steps=3", "train.prompts_per_step=4",
                                 "env=remote", f"env.url=[{digits},{gym}]", "env.weights=[1,1]",
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
