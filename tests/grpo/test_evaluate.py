"""Held-out evaluation: the pass@k estimator by hand, when evals run, bad eval config at start
(before vLLM), and (slow) a real run's eval.jsonl and `python -m lab.evaluate` on a model dir."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from math import comb
from pathlib import Path

import pytest

from conftest import REPO, make_cfg
from envs.synthetic import DigitsEnv
from lab.evaluate import Evaluator, find_model, pass_at_k, served_model
from runtime.logger import RunLogger
from lab.loop import train
from runtime.records import read_jsonl


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 0, 1, 0.0), (4, 1, 1, 0.25), (4, 4, 4, 1.0), (4, 1, 4, 1.0), (4, 1, 2, 0.5),
    (10, 3, 2, 1 - 21 / 45), (5, 2, 4, 1.0),  # fewer than k wrong: every k-subset holds a correct one
    (200, 10, 100, 1 - comb(190, 100) / comb(200, 100)),
])
def test_pass_at_k_known_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12)


def test_pass_at_k_matches_chen_et_al_product_form():
    """Their numerically stable form: 1 - prod_{i=n-c+1}^{n} (1 - k/i)."""
    for n, c, k in [(20, 3, 5), (8, 1, 4), (50, 25, 10), (16, 0, 3)]:
        product = math.prod(1 - k / i for i in range(n - c + 1, n + 1))
        assert pass_at_k(n, c, k) == pytest.approx(1 - product, abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(4, 5, 2), (4, -1, 2), (4, 1, 5), (4, 1, 0)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_evals_at_start_every_n_steps_and_at_the_end():
    ev = Evaluator(DigitsEnv(seed=0), "test", 4, n=4, k=2, max_tokens=8, temperature=1.0, every=10)
    assert [s for s in range(0, 26) if ev.due(s, last=25)] == [0, 10, 20, 25]
    ev.every = 0
    assert [s for s in range(0, 26) if ev.due(s, last=25)] == [0, 25]


def test_eval_line():
    line = RunLogger.eval_line(10, {"eval/pass@1": 0.25, "eval/pass@4": 0.53125, "eval/reward": 0.8125,
                                    "eval/reward/digits": 0.8125, "eval/time_s": 1.42})
    assert line == "eval   10 | pass@1 0.250 | pass@4 0.531 | reward 0.812 | digits 0.812 | 1.4s"


@pytest.mark.parametrize("overrides, error, match", [
    (("eval.n=2", "eval.k=4"), ValueError, r"eval.n=2 < eval.k=4: pass@4 needs at least k samples"),
    (("eval.k=1",), ValueError, r"eval.k=1: must be >= 2"),
    (("eval.split=validation",), ValueError, r"eval.split='validation': Digits has one held-out split"),
    (("eval.num_prompts=5000",), ValueError, r"eval.num_prompts=5000: eval.split='test' has only"),
    # instantiate(cfg.env) wraps the env's ValueError in Hydra's InstantiationException, message kept
    (("+env.reward_weights.length=0.5",), Exception, r"env.reward_weights.length: this env has no reward component"),
    (("env=gsm8k", "eval.split=validation"), FileNotFoundError, r"eval.split='validation': GSM8K data not found"),
])
def test_bad_eval_or_reward_config_fails_at_start_before_vllm(tmp_path, overrides, error, match):
    # No server.base_url: had the run got as far as vLLM it would start one (minutes); it must not.
    with pytest.raises(error, match=match):
        train(make_cfg("log.wandb.mode=disabled", *overrides), tmp_path)
    assert not (tmp_path / "vllm.log").exists()


def test_find_model_in_run_checkpoint_and_model_dirs(tmp_path, tiny_model_path):
    assert find_model(Path(tiny_model_path)) == (Path(tiny_model_path).resolve(), None, None)
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    for step in (2, 4):
        (run / "checkpoints" / f"step-00000{step}" / "policy").mkdir(parents=True)
        (run / "checkpoints" / f"step-00000{step}" / "COMPLETE").write_text(json.dumps({"step": step}))
    assert find_model(run) == (run / "checkpoints" / "step-000004" / "policy", run, 4)
    assert find_model(run / "checkpoints" / "step-000002") == (run / "checkpoints" / "step-000002" / "policy", run, 2)
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    assert find_model(run) == (run / "final", run, None) == find_model(run / "final")
    with pytest.raises(FileNotFoundError, match="not a run dir"):
        find_model(tmp_path)


def test_a_lora_adapter_is_served_merged_or_as_a_lora_module(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base", "r": 12}))
    path, args, name = served_model(tmp_path)
    assert path == Path("/models/base") and name == "eval-adapter"
    assert args == ["--enable-lora", "--max-lora-rank", "16", "--max-loras", "1", "--lora-modules", f"eval-adapter={tmp_path}"]
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    assert served_model(tmp_path) == (tmp_path / "merged", [], None)
    assert served_model(tmp_path / "merged") == (tmp_path / "merged", [], None)


@pytest.mark.slow
def test_run_evaluates_at_start_and_end(attach, tmp_path):
    """2 steps with eval every step: eval.jsonl has steps 0, 1, 2 with real numbers, one row per prompt."""
    cfg = make_cfg(attach, "log.wandb.mode=disabled", "log.progress=false", "train.steps=2", "eval.every=1",
                   "eval.num_prompts=6", "eval.n=4", "eval.k=2")
    train(cfg, tmp_path)
    evals = read_jsonl(tmp_path / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 1, 2]
    for e in evals:
        assert 0.0 <= e["eval/pass@1"] <= e["eval/reward"] + 1e-9 <= 1.0 + 1e-9  # digits == 1 counts as a pass
        assert 0.0 <= e["eval/pass@2"] <= 1.0 and e["eval/reward/digits"] == e["eval/reward"]
    # The untrained tiny model is at chance (~0.08 digit fraction) and never all-digits greedily.
    assert evals[0]["eval/reward"] < 0.3 and evals[0]["eval/pass@1"] == 0.0
    rows = read_jsonl(tmp_path / "eval_samples.jsonl")
    assert len(rows) == 3 * 6 and all(len(r["samples"]) == 4 and 0 <= r["sample_successes"] <= 4 for r in rows)
    env = DigitsEnv(seed=0)
    trained = {p.messages[1]["content"] for p in env.prompts}
    assert not trained & {r["prompt"] for r in rows}  # held-out prompts only
    for e in evals:  # the eval line is the mean of its rows
        mine = [r for r in rows if r["step"] == e["step"]]
        assert e["eval/pass@2"] == pytest.approx(sum(r["pass@2"] for r in mine) / 6)
        assert e["eval/pass@1"] == pytest.approx(sum(r["greedy_success"] for r in mine) / 6)
    assert "reward/digits" in read_jsonl(tmp_path / "metrics.jsonl")[0]


@pytest.mark.slow
def test_evaluate_cli_on_a_model_dir(tiny_model_path, tmp_path):
    """`python -m lab.evaluate <model dir>` starts its own vLLM, evaluates, stops it."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "lab.evaluate", tiny_model_path, "--out", str(out),
                           "eval.num_prompts=4", "eval.n=2", "eval.k=2"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = read_jsonl(out / "eval.jsonl")[0]
    assert record["model"] == str(tiny_model_path) and record["step"] is None
    assert 0.0 <= record["eval/reward"] < 0.3 and record["eval/pass@1"] == 0.0  # untrained: chance
    assert len(read_jsonl(out / "eval_samples.jsonl")) == 4 and (out / "vllm.log").exists()
    assert json.loads(proc.stdout)["eval/pass@2"] == record["eval/pass@2"]
