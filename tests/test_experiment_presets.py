"""Training presets, conf/experiment/<name>.yaml (`python train.py experiment=<name>`): deltas in
lightning-hydra-template style (`# @package _global_`, a defaults list overriding groups, then
keys). Each composes and passes validate(); each on the tiny model trains one step against the
session's vLLM server. A preset for a real model on GPU (qwen_gsm8k) is composed and validated
only: it cannot attach to the tiny-model server, and its weights come from the hub.
(Benchmark presets are conf/bench/: tests/experiments/test_presets.py.)"""

from __future__ import annotations

import math

import pytest

from conftest import REPO, make_cfg
from lab.loop import train
from runtime.config import validate
from runtime.records import read_jsonl

PRESETS = sorted((REPO / "conf" / "experiment").glob("*.yaml"))
NAMES = [p.stem for p in PRESETS]
# The presets the session server can run: its own model (the default tiny one) on CPU. A preset
# with a model of its own (experiment=arith: another tokenizer, warm-started) runs on its own
# server in its own test (tests/test_arith.py).
SERVED = make_cfg().model


def on_session_server(name: str) -> bool:
    cfg = make_cfg(f"experiment={name}")
    return (cfg.model.tiny == SERVED.tiny and cfg.model.get("warm_start") is None
            and cfg.hardware.device == "cpu")


ON_TINY = [n for n in NAMES if on_session_server(n)]
ONE_STEP = ("train.steps=1", "log.wandb.mode=disabled", "log.progress=false", "eval.num_prompts=2")


def test_there_are_presets():
    assert {"gsm8k_lora", "digits_async", "qwen_gsm8k"} <= set(NAMES)
    assert {"gsm8k_lora", "digits_async"} <= set(ON_TINY) and not {"qwen_gsm8k", "arith"} & set(ON_TINY)


@pytest.mark.parametrize("name", NAMES)
def test_header_is_a_global_delta_with_its_command(name):
    lines = (REPO / "conf" / "experiment" / f"{name}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1].startswith(f"# python train.py experiment={name}")


@pytest.mark.parametrize("name", NAMES)
def test_composes_and_validates(name):
    validate(make_cfg(f"experiment={name}"))


def test_presets_choose_what_they_say():
    lora = make_cfg("experiment=gsm8k_lora")
    assert (lora.name, lora.env._target_, lora.rollout.max_tokens) == ("lora-reload", "envs.gsm8k.GSM8KEnv", 256)
    assert lora.optimizer.lr == 1e-2  # the model's own LoRA rate: model.lora_lr in conf/model/tiny.yaml
    assert make_cfg("experiment=digits_async").train.max_staleness == 1
    qwen = make_cfg("experiment=qwen_gsm8k")
    assert (qwen.model.path, qwen.hardware.device, qwen.env._target_) == \
        ("Qwen/Qwen2.5-0.5B-Instruct", "cuda:0", "envs.gsm8k.GSM8KEnv")
    assert qwen.rollout.max_tokens == 512 and qwen.optimizer.lr == 1e-6
    # The command line still wins over a preset's choices.
    assert make_cfg("experiment=qwen_gsm8k", "hardware=gpu_split").hardware.vllm_devices == "1"


@pytest.mark.slow
@pytest.mark.parametrize("name", ON_TINY)
def test_preset_trains_one_step(name, attach, tmp_path):
    history = train(make_cfg(f"experiment={name}", attach, *ONE_STEP), tmp_path)
    assert len(history) == 1 and math.isfinite(history[0]["loss"])
    assert [m["step"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == [1]
    assert read_jsonl(tmp_path / "sync.jsonl")  # the step's weights reached the server
