"""Multi-turn episodes (lab/episodes.py) with a scripted client: masks token by token, env ids
decoding to exactly the tool message, zero gradient at env positions, every stop rule, an env
that raises, seeds per (sample, turn), and the episode metrics by hand."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from envs.calc import CalcEnv
from envs.episode import Reply
from grpo.batch import Rollout, build_batch
from grpo.data import Completion
from grpo.loss import GRPOLoss
from grpo.policy import Policy, completion_logits, gathered_logprobs
from grpo.seeds import turn_seed
from grpo.stitch import ChatTemplate
from lab.episodes import Episodes
from support import ScriptedClient

CALL, ANSWER = "<calc>37*41</calc>", "1517"
TOOL_IDS_TEXT = "<|im_end|>\n<|im_start|>tool\n1517<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer(calc_model_path):
    return AutoTokenizer.from_pretrained(calc_model_path)


def episodes(tokenizer, env=None, max_turns=3, max_total_tokens=None) -> Episodes:
    return Episodes(env or CalcEnv(num_prompts=8), ChatTemplate(tokenizer, "tiny-calc"), max_turns=max_turns,
                    max_total_tokens=max_total_tokens)


def run(tokenizer, script, n=2, seed=100, **kwargs):
    env = kwargs.pop("env", None) or CalcEnv(num_prompts=8)
    loop = episodes(tokenizer, env, **kwargs)
    prompts = env.sample(1)
    client = ScriptedClient(tokenizer, script)
    groups = loop.generate(client, prompts, [loop.encode(p.messages) for p in prompts], n, seed, stride=8)
    rollout = Rollout(prompts, [loop.encode(p.messages) for p in prompts], groups)
    rollout.set_scores(loop.score(prompts, groups), env.reward_weights)
    return rollout, client


def lengths(tokenizer, text, eos=False):
    return len(tokenizer(text, add_special_tokens=False).input_ids) + eos


def test_mask_is_sampled_turns_and_zero_on_exactly_the_tool_message(tokenizer):
    rollout, client = run(tokenizer, [(CALL, False), (ANSWER, True)])
    c = rollout.groups[0][0]
    t1, t2 = lengths(tokenizer, CALL), lengths(tokenizer, ANSWER, eos=True)
    env = len(tokenizer(TOOL_IDS_TEXT, add_special_tokens=False).input_ids)
    assert c.mask == [1] * t1 + [0] * env + [1] * t2
    assert tokenizer.decode([t for t, m in zip(c.token_ids, c.mask) if m == 0]) == TOOL_IDS_TEXT
    assert [lp for lp, m in zip(c.logprobs, c.mask) if m == 0] == [0.0] * env
    assert c.logprobs[:t1] == [-0.25 - 0.01 * i for i in range(t1)]  # sampled logprobs verbatim
    assert c.dialogue.messages == [{"role": "assistant", "content": CALL}, {"role": "tool", "content": "1517"},
                                   {"role": "assistant", "content": ANSWER}]
    assert (c.dialogue.stop, c.dialogue.turns, c.dialogue.tool_calls, c.dialogue.tool_errors) == ("eos", 2, 1, 0)
    assert [(text, m) for text, m in c.dialogue.spans] == [(CALL, 1), (TOOL_IDS_TEXT, 0), (ANSWER + "<|im_end|>", 1)]
    assert rollout.components["used_tool"].tolist() == [[1.0, 1.0]]
    # the second turn: one request per live episode, seeded from (its sample's seed, turn 1)
    assert client.requests == [("first", 100, None), ("next", [turn_seed(100, 1, 8), turn_seed(101, 1, 8)], [16, 16])]
    metrics = rollout.completion_metrics()
    assert metrics["completion_len_mean"] == t1 + t2  # env tokens do not count
    assert (metrics["turns_mean"], metrics["env_tokens_mean"], metrics["tool_calls"], metrics["tool_errors"]) == \
        (2.0, env, 1.0, 0.0)
    assert metrics["stop/eos"] == 1.0 and metrics["stop/length"] == metrics["stop/error"] == 0.0


@pytest.mark.parametrize("loss_type, beta", [("grpo", 0.0), ("bnpo", 0.1), ("dr_grpo", 0.0), ("dapo", 0.1)])
def test_the_loss_gradient_at_env_positions_is_exactly_zero(tokenizer, calc_model_path, loss_type, beta):
    rollout, _ = run(tokenizer, [(CALL, False), (ANSWER, True)], n=2)
    rollout.groups[0][1] = Completion(rollout.groups[0][1].token_ids[:3], [-0.3] * 3, "", "length")  # a 1-turn row
    batch = build_batch(rollout, torch.tensor([[1.0, -1.0]]), pad_id=tokenizer.pad_token_id)
    policy = Policy(calc_model_path)
    logits = completion_logits(policy.model, batch.input_ids, batch.attention_mask, batch.prompt_len)
    logits.retain_grad()
    logp, _ = gathered_logprobs(logits, batch.input_ids[:, batch.prompt_len:])
    ref = logp.detach() + 0.05
    loss = GRPOLoss(loss_type=loss_type, beta=beta, max_completion_length=48)
    out = loss(logp, logp.detach() - 0.1, batch.sampling_logp, ref, batch.advantages, batch.completion_mask,
               num_items_in_batch=batch.completion_mask.sum())
    out.loss.backward()
    mask = batch.completion_mask[0].bool()
    env = ~mask[:len(rollout.groups[0][0].token_ids)]
    assert env.sum() > 0
    assert torch.equal(logits.grad[0, :len(env)][env], torch.zeros_like(logits.grad[0, :len(env)][env]))
    assert (logits.grad[0][mask].abs().sum(-1) > 0).all()  # every sampled position trains
    assert batch.completion_mask.sum() == sum(sum(c.sampled_mask) for c in rollout.groups[0])  # the normalisers' count


def test_length_a_cut_turn_is_never_stitched(tokenizer):
    rollout, _ = run(tokenizer, [("1 2 3 4 5 6 7 8 9 10 11 12 " + CALL, False)])
    c = rollout.groups[0][0]
    assert c.dialogue.stop == "length" and c.mask == [1] * 16 and c.finish_reason == "length"


def test_max_turns_the_last_reply_is_not_appended(tokenizer):
    rollout, client = run(tokenizer, [(CALL, False)], max_turns=1)
    c = rollout.groups[0][0]
    assert c.dialogue.stop == "max_turns" and c.mask == [1] * lengths(tokenizer, CALL)
    assert [kind for kind, *_ in client.requests] == ["first"]
    rollout, _ = run(tokenizer, [(CALL, False)], max_turns=3)  # calls every turn
    c = rollout.groups[0][0]
    assert (c.dialogue.stop, c.dialogue.turns, c.dialogue.tool_calls) == ("max_turns", 3, 2)


def test_budget_an_env_reply_that_overflows_is_not_appended_and_a_turn_gets_what_is_left(tokenizer):
    t1 = lengths(tokenizer, CALL)
    env = len(tokenizer(TOOL_IDS_TEXT, add_special_tokens=False).input_ids)
    rollout, _ = run(tokenizer, [(CALL, False), (ANSWER, True)], max_total_tokens=t1 + env)  # no token left after
    c = rollout.groups[0][0]
    assert c.dialogue.stop == "budget" and c.mask == [1] * t1
    rollout, client = run(tokenizer, [(CALL, False), ("1517 is it", True)], max_total_tokens=t1 + env + 2)
    c = rollout.groups[0][0]
    assert client.requests[1][2] == [2, 2] and c.dialogue.stop == "budget" and len(c.token_ids) == t1 + env + 2


class FlakyEnv(CalcEnv):
    """Raises at its second reply (or at start): an env bug."""

    def __init__(self, at_start=False):
        super().__init__(num_prompts=8)
        self.at_start = at_start

    def start(self, prompt, seed):
        if self.at_start:
            raise RuntimeError("no episode today")
        episode, calls = super().start(prompt, seed), []

        class Flaky:
            def step(self, text):
                calls.append(text)
                if len(calls) == 2:
                    raise KeyError("boom")
                return episode.step(text)

        return Flaky()


@pytest.mark.parametrize("at_start", [False, True])
def test_an_env_that_raises_gives_nan_reward_and_a_fully_masked_completion(tokenizer, at_start):
    rollout, _ = run(tokenizer, [(CALL, False)], env=FlakyEnv(at_start))
    c = rollout.groups[0][0]
    assert c.dialogue.stop == "error" and set(c.mask) == {0} and len(c.mask) > 0
    assert ("boom" if not at_start else "no episode today") in c.dialogue.error
    assert math.isnan(rollout.rewards[0, 0]) and math.isnan(rollout.components["used_tool"][0, 0])
    assert rollout.reward_metrics()["reward_nan"] == 2
    assert rollout.completion_metrics()["stop/error"] == 1.0


def test_tool_output_is_capped_at_max_tool_chars(tokenizer):
    class Loud(CalcEnv):
        def start(self, prompt, seed):
            return type("E", (), {"step": lambda self, text: Reply([{"role": "tool", "content": "9" * 500}], False)})()

    env = Loud(num_prompts=8, max_tool_chars=5)
    rollout, _ = run(tokenizer, [(CALL, False), (ANSWER, True)], env=env)
    assert rollout.groups[0][0].dialogue.messages[1] == {"role": "tool", "content": "99999"}


def test_a_stop_token_that_is_not_one_token_is_refused(tokenizer):
    class Multi(CalcEnv):
        stop_tokens = ("</tool_call>",)

    with pytest.raises(ValueError, match=r"tiny-calc: the env's stop token '</tool_call>' is \d+ tokens"):
        episodes(tokenizer, Multi(num_prompts=8))
