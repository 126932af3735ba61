"""Dynamic sampling against the real vLLM server: a run where half the groups tie trains only on
untied groups, fills every step, and a resumed run draws exactly the same groups."""

from __future__ import annotations


import pytest

from conftest import make_cfg
from envs.synthetic import DigitsEnv
from lab.loop import train
from runtime.records import read_jsonl

pytestmark = pytest.mark.slow


class HalfTiedDigits(DigitsEnv):
    """Digits where every prompt with an even start number k scores 0.5 on every completion: about
    half of the groups tie, whatever the policy does."""

    def score(self, prompts, completions):
        scores = super().score(prompts, completions)
        return [[{"digits": 0.5} for _ in row] if p.meta["k"] % 2 == 0 else row for p, row in zip(prompts, scores)]


RUN = ("env._target_=test_dynamic_sampling_run.HalfTiedDigits", "train.dynamic_sampling=true",
       "train.max_sampling_rounds=4", "log.wandb.mode=disabled", "log.progress=false", "log.samples_every=1",
       "train.prompts_per_step=4", "train.group_size=4", "train.checkpoint_every=2", "rollout.max_tokens=8",
       "eval.enabled=false", "hardware.autocast=null")


@pytest.mark.parametrize("loop", [(), pytest.param(("train.max_staleness=1",), marks=pytest.mark.heavy)],
                         ids=["sync", "async"])
def test_half_tied_run_trains_on_untied_groups_fills_and_resumes_exactly(attach, tmp_path, loop):
    """4 steps straight, and 3 steps then a resume from the step-2 checkpoint (with async, the
    rollout of step 3 was in flight there), give the same groups and the same numbers."""
    straight = train(make_cfg(attach, *RUN, *loop, "train.steps=4"), tmp_path / "straight")
    train(make_cfg(attach, *RUN, *loop, "train.steps=3"), tmp_path / "split")
    resumed = train(make_cfg(attach, *RUN, *loop, "train.steps=4",
                             f"resume={tmp_path}/split/checkpoints/step-000002"), tmp_path / "resumed")

    for m in straight:
        assert m["dynamic/groups_kept"] == 4 and m["dynamic/filled"] == 1.0 and m["tied_group_frac"] == 0.0
        assert m["dynamic/prompts_sampled"] == 4 * m["dynamic/rounds"]
    assert sum(m["dynamic/groups_dropped"] for m in straight) >= 4  # about half of >= 16 prompts tie
    assert max(m["dynamic/rounds"] for m in straight) >= 2  # a step had to sample more prompts
    samples = read_jsonl(tmp_path / "straight" / "samples.jsonl")
    starts = {int(s["prompt"].rstrip(":").split()[-1]) for s in samples}
    assert len(starts) >= 8 and all(k % 2 == 1 for k in starts)  # no tied (even-k) group was trained on

    assert len(resumed) == 2
    for a, b in zip(straight[2:], resumed):
        for key in ("dynamic/rounds", "dynamic/groups_dropped", "completion_len_mean"):
            assert b[key] == a[key], key
        for key in ("reward_mean", "loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    # the same groups, completions and advantages
    assert read_jsonl(tmp_path / "resumed" / "samples.jsonl") == [s for s in samples if s["step"] >= 3]
