"""`hardware.compile=auto`: compile only once the rest of the run repays the compiling, decided
after the first step on its measured train phase; a bad value fails at start by its key."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import make_cfg
from lab import autocompile
from lab.autocompile import COMPILE_S, SAVING, worth_compiling
from runtime.config import validate


def test_the_threshold_is_the_measured_payback():
    # ~28M in fp32 (train phase ~15 s eager on the AVX2 dev machine): 100 s / (0.1 x 15 s) = 66.7 steps.
    assert not worth_compiling(15.0, 66) and worth_compiling(15.0, 67)
    # In bf16 compile saves more: ~85M x 256 tokens' 21 s train phase repays it within 20 steps.
    assert not worth_compiling(21.0, 19, torch.bfloat16) and worth_compiling(21.0, 20, torch.bfloat16)
    assert not worth_compiling(0.4, 39) and not worth_compiling(0.4, 39, torch.bfloat16)  # the default toy run
    assert worth_compiling(COMPILE_S / SAVING[torch.float32] / 100 * 1.01, 100, torch.float16)  # unmeasured: fp32's


class Spy:
    def __init__(self):
        self.compiled, self.events, self.precision = False, [], None

    def compile(self):
        self.compiled = True


def fake_run(compile, steps, start_step=0):
    policy = Spy()
    policy.precision = SimpleNamespace(compute=torch.float32)
    logger = SimpleNamespace(event=lambda step, kind, **info: policy.events.append((step, kind, info)))
    cfg = make_cfg(f"hardware.compile={compile}", f"train.steps={steps}")
    return SimpleNamespace(cfg=cfg, policy=policy, logger=logger, start_step=start_step)


@pytest.mark.parametrize("compile, steps, train_s, start, expected", [
    ("auto", 300, 15.0, 0, True),  # 299 steps left x 1.5 s saved > 100 s
    ("auto", 40, 0.4, 0, False),  # the toy run never repays it
    ("auto", 300, 15.0, 290, False),  # a resumed run decides on its own first step: 9 x 1.5 s < 100 s
    ("false", 300, 15.0, 0, False),
])
def test_auto_compiles_after_the_first_step_only_when_it_pays(compile, steps, train_s, start, expected):
    run = fake_run(compile, steps, start)
    decided = autocompile.after_step(run, start + 1, train_s)
    assert decided == expected and run.policy.compiled == expected
    assert [kind for _, kind, _ in run.policy.events] == (["compile"] if expected else [])
    assert not autocompile.after_step(run, start + 2, 1e6)  # decided once, on the first step


def test_a_bad_compile_value_is_named():
    with pytest.raises(ValueError, match="hardware.compile='sometimes'"):
        validate(make_cfg("hardware.compile=sometimes"))
    for ok in ("true", "false", "auto"):
        validate(make_cfg(f"hardware.compile={ok}"))
