"""Exact resume: 6 steps straight and 3 steps + stop + resume for 3 more give the same run."""

from __future__ import annotations


import pytest

from conftest import SEEDED as RUN
from conftest import make_cfg, straight_run
from lab.loop import train
from runtime.records import read_jsonl

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("overrides", [("mode=reload",), ("mode=lora", "optimizer.lr=1e-2")], ids=["reload", "lora"])
def test_resumed_run_repeats_the_straight_one(attach, tmp_path, tmp_path_factory, overrides):
    straight = straight_run(tmp_path_factory, *overrides, attach, *RUN, "train.steps=6")
    split = tmp_path / "split"
    train(make_cfg(*overrides, attach, *RUN, "train.steps=3"), split)
    assert (split / "checkpoints" / "step-000003" / "COMPLETE").is_file()
    resumed = train(make_cfg(*overrides, attach, *RUN, "train.steps=6", f"resume={split}"), split)

    assert len(resumed) == 3
    metrics = read_jsonl(split / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, metrics):
        assert b["completion_len_mean"] == a["completion_len_mean"]
        for key in ("reward_mean", "reward_std", "loss", "grad_norm", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (b["step"], key)
    # Not the trivial "nothing moved": the weights got gradients and the rewards changed.
    assert max(m["grad_norm"] for m in metrics) > 1e-3
    assert len({m["reward_mean"] for m in metrics}) > 1
    assert any(e["event"] == "resumed" for e in read_jsonl(split / "events.jsonl"))
    # Each prompt has its own seeds: two prompts never get the same group of completions.
    samples = read_jsonl(split / "samples.jsonl")
    groups = {}
    for row in samples:
        groups.setdefault((row["step"], row["prompt"]), []).append(row["completion"])
    assert len({tuple(g) for g in groups.values()}) == len(groups)
