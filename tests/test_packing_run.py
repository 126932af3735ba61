"""End to end: a run with packed token-budget micro-batches and the chunked LM head is the padded
run, step for step, to fp32 tolerance (same seeded rollouts, same normalisers)."""

from __future__ import annotations

import pytest

from conftest import make_cfg, restore_pristine
from lab.loop import train

# fp32 on both sides (hardware.autocast=null), 3 steps of 2 prompts x 4 Digits completions of
# 1-8 tokens (EOS ends some early): prompts of ~25 tokens: budget 80 packs 2-3 rows per micro-batch.
RUN = ("log.wandb.mode=disabled", "log.progress=false", "eval.enabled=false", "train.prompts_per_step=2",
       "train.group_size=4", "train.steps=3", "rollout.max_tokens=8", "model.dtype=float32", "hardware.autocast=null",
       "train.micro_batch_size=3")


@pytest.mark.slow
def test_packed_chunked_run_matches_the_padded_run(vllm_server, tiny_model_path, tmp_path):
    runs = []
    for extra in ((), ("train.max_tokens_per_micro_batch=80", "train.logprob_chunk_tokens=5")):
        restore_pristine(vllm_server, tiny_model_path)
        runs.append(train(make_cfg(*RUN, f"server.base_url={vllm_server.base_url}", *extra),
                          tmp_path / ("packed" if extra else "padded")))
    padded, packed = runs
    assert len(padded) == len(packed) == 3
    for step, (a, b) in enumerate(zip(padded, packed), 1):
        assert a["completion_len_mean"] == b["completion_len_mean"], step  # the same rollouts
        assert a["reward_mean"] == b["reward_mean"], step
        # Step-wide figures: the same normalisers, so the same numbers to fp32 rounding.
        for key in ("loss", "entropy", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (step, key)
        # Per-micro-batch means (logprob_gap, clip_frac, ...) are averaged over micro-batches by
        # rows, so they follow the grouping; the packed trainer still agrees with vLLM to fp32's.
        assert b["logprob_gap"] < 1e-3 and abs(b["logprob_gap"] - a["logprob_gap"]) < 1e-5, step
