"""Multi-turn against real vLLM: sampled logprobs of stitched episodes match the trainer's at the
sampled positions; `env=calc` learns to call its tool in every weight-sync mode, async, with
held-out eval and samples logged whole; a resumed run repeats its episodes exactly."""

from __future__ import annotations

import string

import pytest
import torch
from transformers import AutoTokenizer

from conftest import PROBE_TOL, make_cfg
from envs.calc import CalcEnv
from envs.episode import Reply
from grpo.batch import Rollout, build_batch
from grpo.policy import Policy
from grpo.stitch import ChatTemplate
from lab.episodes import Episodes
from lab.loop import train
from runtime.records import read_jsonl
from serving.client import VLLMClient

pytestmark = pytest.mark.slow

QUIET = ("env=calc", "log.wandb.mode=disabled", "log.progress=false", "eval.num_prompts=4", "eval.n=2", "eval.k=2",
         "eval.every=0", "log.samples_every=4")


class Chatty(CalcEnv):
    """Answers every turn; a turn ends on any single-character letter token, so a random model's
    episodes run several turns."""

    def __init__(self, tokenizer):
        super().__init__(num_prompts=8)
        self.stop_tokens = tuple(c for c in string.ascii_lowercase if len(tokenizer(c).input_ids) == 1)

    def start(self, prompt, seed):
        return type("Echo", (), {"step": lambda self, text: Reply([{"role": "tool", "content": "ok 42"}], False)})()


def test_sampled_logprobs_match_the_trainers_on_the_stitched_sequence(attach, vllm_server, tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    env = Chatty(tokenizer)
    loop = Episodes(env, ChatTemplate(tokenizer, "tiny"), max_turns=3, max_total_tokens=None)
    prompts = env.sample(4)
    prompt_ids = [loop.encode(p.messages) for p in prompts]
    client = VLLMClient(vllm_server, make_cfg().model.served_name, max_tokens=12)
    groups = loop.generate(client, prompts, prompt_ids, 4, seed=7, stride=16)
    completions = [c for g in groups for c in g]
    assert max(c.dialogue.turns for c in completions) == 3 and sum(c.dialogue.turns > 1 for c in completions) >= 4
    batch = build_batch(Rollout(prompts, prompt_ids, groups), torch.zeros(4, 4), tokenizer.pad_token_id)
    with torch.no_grad():
        logp = Policy(tiny_model_path).logprobs(batch)  # fp32, as the session server serves
    sampled = batch.completion_mask.bool()
    assert (logp[sampled] - batch.sampling_logp[sampled]).abs().max() < PROBE_TOL
    # The same episodes again: every turn's seed is fixed by (seed, sample, turn).
    again = loop.generate(client, prompts, prompt_ids, 4, seed=7, stride=16)
    assert [c.token_ids for g in again for c in g] == [c.token_ids for c in completions]


def assert_learned_to_call(run_dir, history) -> None:
    """From chance (a call in ~5 % of first episodes, measured) to a call the calculator evaluates
    in >= 80 % of the last step's episodes, which then run more than one turn."""
    used = [round(m["reward/used_tool"], 3) for m in history]
    assert used[0] < 0.3 and used[-1] >= 0.8 and history[-1]["turns_mean"] > 1.5, used
    for m in history:
        assert sum(m[f"stop/{r}"] for r in ("eos", "length", "max_turns", "budget", "error")) == pytest.approx(1.0)
        assert m["completion_len_mean"] <= 3 * 16  # sampled tokens only: env tokens do not count
    rows = read_jsonl(run_dir / "samples.jsonl")
    called = [r for r in rows if any(m["role"] == "tool" for m in r["conversation"])]
    assert called and all(0 in r["mask"] and "".join(t for t, _ in r["spans"]) == r["completion"] for r in called)
    assert {"eval/pass@1", "eval/reward/used_tool"} <= set(read_jsonl(run_dir / "eval.jsonl")[-1])


# CI: the shortest forms (reload, LoRA, async); the other weight paths are the heavy variants. A
# faster lr does not shorten a full-weight run: at 4e-4 the policy settles on the bare `</calc>`
# (every call refused, used_tool 0.5 for all: tied groups) before it finds a call that evaluates.
@pytest.mark.parametrize("overrides, steps", [
    (("mode=reload",), 16), (("mode=lora", "optimizer.lr=3e-3"), 16),
    (("mode=reload", "train.max_staleness=1"), 26),
    pytest.param(("mode=lora", "sync=adapter", "optimizer.lr=3e-3"), 12, marks=pytest.mark.heavy),
    pytest.param(("mode=broadcast",), 16, marks=pytest.mark.heavy),
], ids=["reload", "lora", "async", "lora_adapter", "broadcast"])
def test_calc_learns_to_call_its_tool(attach, tmp_path, overrides, steps):
    history = train(make_cfg(*overrides, attach, *QUIET, f"train.steps={steps}"), tmp_path)
    assert_learned_to_call(tmp_path, history)


# Modes that start a server of their own: shared (the trainer built on vLLM's memory) learns as
# the others; legacy restarts vLLM at every sync (25-55 s here), so it runs 3 steps of episodes.
@pytest.mark.heavy
@pytest.mark.parametrize("overrides, steps", [(("mode=legacy",), 3), (("mode=shared", "model.dtype=float32"), 16)],
                         ids=["legacy", "shared"])
def test_calc_runs_in_modes_with_a_server_of_their_own(tmp_path, overrides, steps):
    history = train(make_cfg(*overrides, *QUIET, f"train.steps={steps}"), tmp_path)
    if steps < 16:
        assert len(history) == steps and all(m["turns_mean"] >= 1 and m["stop/error"] == 0 for m in history)
    else:
        assert_learned_to_call(tmp_path, history)


def test_resumed_calc_run_repeats_its_episodes(attach, tmp_path):
    # 32 episodes a step: a few run more than one turn from step 1 (~5 % call at chance).
    run = (*QUIET, "eval.enabled=false", "train.prompts_per_step=4", "train.group_size=8", "model.dtype=float32",
           "hardware.autocast=null", "train.checkpoint_every=2")
    straight = train(make_cfg(attach, *run, "train.steps=4"), tmp_path / "straight")
    split = tmp_path / "split"
    train(make_cfg(attach, *run, "train.steps=2"), split)
    train(make_cfg(attach, *run, "train.steps=4", f"resume={split}"), split)
    resumed = read_jsonl(split / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        for key in ("turns_mean", "env_tokens_mean", "completion_len_mean", "stop/max_turns"):
            assert b[key] == a[key], (b["step"], key)
        for key in ("reward_mean", "loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (b["step"], key)
    assert max(m["turns_mean"] for m in resumed) > 1
