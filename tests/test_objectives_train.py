"""Each objective (conf/loss/ presets, TRL's loss types) trains the default Digits run, against the
session's real vLLM server: chance is ~0.09, and the default grpo run passes 0.8 by step 8. The
float64 tests against TRL's formulas (tests/grpo/test_objectives.py) are every objective's CI
counterpart; CI trains three of them here, the rest are heavy."""

from __future__ import annotations

import pytest

from conftest import REPO, make_cfg
from train import train

pytestmark = pytest.mark.slow

PRESETS = sorted(p.stem for p in (REPO / "conf" / "loss").glob("*.yaml"))
IN_CI = {"cispo", "sapo", "vespo"}  # the objectives other than the clipped surrogate
STEPS = 10


@pytest.mark.parametrize("preset", [p if p in IN_CI else pytest.param(p, marks=pytest.mark.heavy) for p in PRESETS])
def test_each_objective_trains_digits_past_0_8(attach, tmp_path, preset):
    history = train(make_cfg(f"loss={preset}", attach, f"train.steps={STEPS}", "eval.enabled=false",
                             "log.wandb.mode=disabled", "log.progress=false", "hardware.autocast=null"), tmp_path)
    rewards = [round(m["reward_mean"], 3) for m in history]
    print(preset, rewards)
    assert rewards[0] < 0.3, rewards
    assert min(rewards[-2:]) >= 0.8, rewards
