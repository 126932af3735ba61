"""The cached warm start (model=tiny_arith: the tiny model after SFT on env=arith, lab/sft.py) is
built once, keyed by everything it depends on, and is partial: it answers some held-out prompts,
not all. GRPO from it (experiment=arith) is served by vLLM and evaluated on the held-out split."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import make_cfg
from lab.loop import train
from lab.server import base_model_path, model_path
from lab.sft import sft_precision, warm_start_key


@pytest.fixture(scope="module")
def arith_model() -> Path:
    return Path(model_path(make_cfg("experiment=arith")))


def test_the_warm_start_is_built_once_and_is_partial(arith_model):
    cfg = make_cfg("experiment=arith")
    assert arith_model.name == f"sft-{warm_start_key(base_model_path(cfg), cfg.model.warm_start, sft_precision(cfg.model, cfg.hardware))}"
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "eval.jsonl"} <= \
        {p.name for p in arith_model.iterdir()}
    started = time.perf_counter()
    assert Path(model_path(cfg)) == arith_model and time.perf_counter() - started < 5  # cached: no training
    summary = json.loads((arith_model / "sft.json").read_text())
    assert summary["pass@1_before"] < 0.05 < summary["pass@1"] < 0.95, summary  # learnt some, not all
    losses = [json.loads(line)["loss"] for line in (arith_model / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    # the key follows the SFT settings, the env and the tiny spec; the run's seed is not in it
    other = make_cfg("experiment=arith", "model.warm_start.sft.steps=151")
    assert model_key(other) != arith_model.name.removeprefix("sft-")
    assert model_key(make_cfg("experiment=arith", "train.seed=3")) == arith_model.name.removeprefix("sft-")


def model_key(cfg) -> str:
    return warm_start_key(base_model_path(cfg), cfg.model.warm_start, sft_precision(cfg.model, cfg.hardware))


def test_grpo_from_the_warm_start_is_served_and_evaluated_as_the_sft_measured_it(arith_model, tmp_path):
    """experiment=arith, 2 steps: vLLM serves the cached warm start, whose held-out greedy pass@1 at
    step 0 is the SFT's own HF measurement on the same 200 prompts (vLLM serves fp32 here, as the
    SFT evaluated: at most 2 prompts apart), and its groups are mixed, not tied: GRPO has signal."""
    history = train(make_cfg("experiment=arith", "train.steps=2", "log.wandb.mode=disabled", "log.progress=false"),
                    tmp_path)
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    sft = [json.loads(line) for line in (arith_model / "eval.jsonl").read_text().splitlines()][-1]
    assert [e["step"] for e in evals] == [0, 2]
    assert abs(evals[0]["eval/pass@1"] - sft["eval/pass@1"]) <= 2 / 200, (evals[0], sft)
    assert all(0 < m["reward_mean"] < 1 and m["tied_group_frac"] < 0.9 for m in history), history
    assert (tmp_path / "final" / "model.safetensors").exists()
