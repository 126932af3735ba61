"""End to end: `train()` on the synthetic env against a real vLLM server learns, and writes the
run record the notebooks read; a reward the env could not give is left out, never a 0."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_cfg, run_precision
from runtime.records import read_jsonl
from support import QUIET, SHORT_RUN, assert_learns, serverless_run
from lab.loop import train, train_step

@pytest.mark.slow
def test_reload_run_learns_and_records_everything(attach, tmp_path):
    history = train(make_cfg("mode=reload", attach, *SHORT_RUN), tmp_path)
    assert_learns(history)

    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 31))
    for key in ("reward_mean", "reward_std", "loss", "kl", "clip_frac", "logprob_gap", "tokens_per_s",
                "time_generate", "time_score", "time_train", "time_sync", "sync_ms", "entropy", "truncated_frac",
                "tied_group_frac", "completion_len_min", "completion_len_mean", "completion_len_max"):
        assert key in metrics[-1], key
    # Digits learns to fill max_tokens with digits: the policy sharpens and completions run to the cap.
    assert metrics[-1]["entropy"] < metrics[0]["entropy"]
    # vLLM's sampled logprobs and the trainer's agree to the precision the two sides compute in
    # (fp32 both: ~1e-6; the trainer in bf16 where the CPU has it: ~5e-3): the IS correction is ~1.
    precision = run_precision(tmp_path)
    assert max(m["logprob_gap"] for m in metrics) < precision.gap_tolerance
    syncs = read_jsonl(tmp_path / "sync.jsonl")
    assert len(syncs) == 30 and all(s["probe_max_diff"] <= precision.probe_tolerance for s in syncs)
    samples = read_jsonl(tmp_path / "samples.jsonl")
    assert {s["step"] for s in samples} == {1, 10, 20, 30}
    assert all(0.0 <= s["reward"] <= 1.0 and "completion" in s for s in samples)
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb offline run written"


@pytest.mark.slow
def test_lora_run_learns_as_typed(attach, tmp_path):
    """`python train.py mode=lora`: merged sync, and the rate finetune=lora takes from the model (measured: chance
    0.09 at step 1, 0.84 at step 5, >= 0.97 from step 6)."""
    history = train(make_cfg("mode=lora", attach, "train.steps=12", *SHORT_RUN[1:]), tmp_path)
    assert history[0]["reward_mean"] < 0.3
    assert min(m["reward_mean"] for m in history[-4:]) >= 0.8
    syncs = read_jsonl(tmp_path / "sync.jsonl")
    tol = run_precision(tmp_path).probe_tolerance
    assert all((s["finetune"], s["sync"]) == ("lora", "reload") and s["probe_max_diff"] <= tol for s in syncs)


@pytest.mark.slow
def test_bf16_trainer_against_an_fp32_server_learns(attach, tmp_path):
    """hardware.autocast=bfloat16 on any CPU (emulated where bf16 is not native, just slower): the
    default of AVX512-BF16 machines, exercised on AVX2 ones too. Learns as the fp32 run does
    (0.90 at step 8), with a gap that shows bf16 and stays within its tolerance."""
    history = train(make_cfg("mode=reload", attach, "hardware.autocast=bfloat16", "train.steps=12", *SHORT_RUN[1:]),
                    tmp_path)
    precision = run_precision(tmp_path)
    assert (precision.compute, precision.served) == (torch.bfloat16, torch.float32)
    assert history[0]["reward_mean"] < 0.3
    assert min(m["reward_mean"] for m in history[-4:]) >= 0.8
    assert 1e-4 < max(m["logprob_gap"] for m in history) < precision.gap_tolerance
    # The probe checks the served fp32 weights at fp32: bf16 compute does not loosen it.
    assert all(s["probe_max_diff"] <= precision.probe_tolerance == 1e-3 for s in read_jsonl(tmp_path / "sync.jsonl"))


@pytest.mark.slow
@pytest.mark.heavy
def test_broadcast_run_learns(attach, tmp_path):
    history = train(make_cfg("mode=broadcast", attach, *SHORT_RUN), tmp_path)
    assert_learns(history)
    syncs = read_jsonl(tmp_path / "sync.jsonl")
    assert all((s["finetune"], s["sync"]) == ("full", "broadcast") and s["bytes"] > 1_000_000 for s in syncs)


@pytest.mark.slow
def test_run_at_temperature_0_7_keeps_trainer_and_vllm_logprobs_together(attach, tmp_path):
    history = train(make_cfg("mode=reload", attach, "rollout.temperature=0.7", "train.steps=3", "hardware.autocast=null",
                             *SHORT_RUN[1:]),
                    tmp_path)
    # Policy gets rollout.temperature from build(): dropped anywhere, the gap would be > 0.05. It is
    # checked in fp32 on every CPU: a bf16 trainer's own gap (~5e-3) is of the same order as that.
    assert run_precision(tmp_path).compute == torch.float32
    assert max(m["logprob_gap"] for m in history) < 1e-3


def test_a_missing_reward_is_left_out_and_counted_never_a_zero(tmp_path, tiny_model_path):
    run = serverless_run(tmp_path, tiny_model_path, make_cfg(*QUIET))  # 2 prompts x 4 samples
    given = [[1.0, None, 0.0, math.nan], [None] * 4]
    run.env.score = lambda prompts, completions: [[{"digits": r} for r in g] for g in given]
    metrics = train_step(run, 1)
    run.logger.close()
    assert metrics["reward_nan"] == 6
    assert metrics["reward_mean"] == 0.5  # of the two given, not (1 + 0 + 0 * 6) / 8
    assert metrics["reward_std"] == pytest.approx(math.sqrt(0.5))
    assert metrics["reward/digits"] == 0.5  # the component's mean, over the values given too
    assert metrics["skipped_updates"] == 0 and math.isfinite(metrics["loss"])
    rewards = [s["reward"] for s in read_jsonl(tmp_path / "samples.jsonl")]
    assert rewards == [1.0, "nan", 0.0, "nan"] + ["nan"] * 4  # samples.jsonl says which were missing


def test_a_step_with_every_loss_option_trains_and_logs_them(tmp_path, tiny_model_path):
    """VESPO with the entropy bonus (adaptive), the entropy and off-policy masks, two passes, the
    overlong component and dynamic sampling through train_step: each shows in the metrics."""
    run = serverless_run(tmp_path, tiny_model_path, make_cfg(
        *QUIET, "train.num_iterations=2", "train.dynamic_sampling=true", "loss=vespo", "loss.entropy_coef=0.01",
        "loss.use_adaptive_entropy=true", "loss.entropy_target=100.0", "loss.top_entropy_quantile=0.5",
        "loss.off_policy_mask_threshold=0.0",
        "overlong.weight=0.5", "overlong.cache=6"))  # rollout.max_tokens=8, FakeClient's 4 tokens: -1/3
    run.env.score = lambda prompts, completions: [[{"digits": r} for r in (0.0, 1.0, 0.5, 0.25)]
                                                  for _ in prompts]
    metrics = train_step(run, 1)
    run.logger.close()
    assert metrics["skipped_updates"] == 0 and metrics["grad_norm"] > 0
    assert metrics["reward/overlong"] == pytest.approx(-1 / 3)
    assert metrics["reward_mean"] == pytest.approx(1.75 / 4 - 0.5 / 3)
    assert metrics["entropy_masked_frac"] == pytest.approx(0.5, abs=0.15)
    assert 0 < metrics["off_policy_masked_frac"] < 1  # vLLM's -1.0 logprobs vs the trainer's
    assert metrics["ratio_min"] <= metrics["ratio_mean"] <= metrics["ratio_max"]
    assert run.loss.entropy_bonus.coef == pytest.approx(0.01 + 2 * 0.005)  # two updates below the target
    assert metrics["dynamic/rounds"] == 1 and metrics["dynamic/groups_kept"] == 2
