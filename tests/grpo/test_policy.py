"""The trainer's logprobs are the sampler's: same temperature, same token ids; under top-p, vLLM's
processed logprobs are renormalised over the nucleus, so they differ by exactly log(1/nucleus mass)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import restore_pristine
from grpo.batch import Rollout, build_batch
from grpo.policy import Policy
from serving.client import VLLMClient
from grpo.data import Completion

PROMPT = [{"role": "user", "content": "Count on from 7:"}]


def one_row_batch(policy: Policy, completion_ids: list[int]):
    prompt_ids = policy.encode_chat(PROMPT)
    completion = Completion(completion_ids, [0.0] * len(completion_ids), "", "length")
    return prompt_ids, build_batch(Rollout([None], [prompt_ids], [[completion]]), torch.zeros(1, 1), policy.pad_id)


def test_trainer_logprobs_are_taken_at_the_sampling_temperature(tiny_model_path):
    """Fails if the temperature is dropped anywhere between Policy and the logits."""
    hot = Policy(tiny_model_path, temperature=0.7)
    completion = [40, 41, 42, 300, 7]
    prompt_ids, batch = one_row_batch(hot, completion)
    with torch.no_grad():
        logits = hot.model(input_ids=torch.tensor([prompt_ids + completion])).logits[0].float()
    steps = logits[len(prompt_ids) - 1 : -1]
    expected = (steps / 0.7).log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
    at_one = steps.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
    with torch.no_grad():
        got = hot.logprobs(batch)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - at_one).abs().max() > 0.05  # the temperature changes these numbers


@pytest.mark.slow
def test_trainer_and_vllm_agree_at_temperature_0_7(vllm_server, tiny_model_path):
    restore_pristine(vllm_server, tiny_model_path)
    policy = Policy(tiny_model_path, temperature=0.7)
    client = VLLMClient(vllm_server, "policy", max_tokens=16, temperature=0.7)
    prompt_ids = policy.encode_chat(PROMPT)
    group = client.generate([prompt_ids], n=8, seed=3)[0]
    gaps = []
    for c in group:
        _, batch = one_row_batch(policy, c.token_ids)
        with torch.no_grad():
            gaps.append((policy.logprobs(batch)[0] - torch.tensor(c.logprobs)).abs().max().item())
    tokens = sum(len(c.token_ids) for c in group)
    print(f"temperature 0.7: max |trainer - vLLM| logprob = {max(gaps):.2e} over {tokens} tokens")
    assert tokens >= 16 and max(gaps) < 1e-3  # fp32 both sides; without the temperature it is > 0.05


@pytest.mark.slow
def test_under_top_p_vllm_logprobs_exceed_the_trainers_by_log_one_over_the_nucleus_mass(vllm_server, tiny_model_path):
    """What `logprob_gap` means with rollout.top_p < 1: not a mismatch but the renormalisation."""
    restore_pristine(vllm_server, tiny_model_path)
    top_p = 0.8
    policy = Policy(tiny_model_path)
    client = VLLMClient(vllm_server, "policy", max_tokens=16, top_p=top_p)
    prompt_ids = policy.encode_chat(PROMPT)
    gaps, expected = [], []
    for c in client.generate([prompt_ids], n=8, seed=5)[0]:
        _, batch = one_row_batch(policy, c.token_ids)
        with torch.no_grad():
            mine = policy.logprobs(batch)[0]
            logits = policy.model(input_ids=torch.tensor([prompt_ids + c.token_ids])).logits[0, len(prompt_ids) - 1 : -1]
        # vLLM's top-p: drop the least likely tokens while their cumulative mass stays <= 1 - top_p.
        probs = logits.float().softmax(-1).sort(-1).values
        dropped = (probs * (probs.cumsum(-1) <= 1 - top_p)).sum(-1)
        expected += (-torch.log1p(-dropped)).tolist()
        gaps += (torch.tensor(c.logprobs) - mine).tolist()
    print(f"top_p {top_p}: mean gap {sum(gaps) / len(gaps):.3f} (log 1/top_p = {math.log(1 / top_p):.3f}), "
          f"max |gap - log(1/nucleus mass)| = {max(abs(g - e) for g, e in zip(gaps, expected)):.2e}")
    assert min(gaps) > -1e-3  # vLLM's processed logprob is never below the trainer's
    assert max(abs(g - e) for g, e in zip(gaps, expected)) < 1e-3


def test_compile_keeps_the_parameter_names_the_bridges_key_on(tiny_model_path):
    """`hardware.compile` compiles in place: torch.compile(model) would prefix every name with
    `_orig_mod.`, and the reload/broadcast/shared bridges and checkpoints would miss them all."""
    plain, compiled = Policy(tiny_model_path), Policy(tiny_model_path, compile=True)
    assert list(compiled.model.state_dict()) == list(plain.model.state_dict())
    assert [n for n, _ in compiled.model.named_parameters()] == [n for n, _ in plain.model.named_parameters()]


@pytest.mark.heavy
def test_compiled_model_gives_the_same_logprobs_and_gradients(tiny_model_path):
    plain, compiled = Policy(tiny_model_path), Policy(tiny_model_path, compile=True)
    _, batch = one_row_batch(plain, [40, 41, 42, 300, 7])
    grads = []
    for policy in (plain, compiled):
        logp = policy.logprobs(batch)
        logp.sum().backward()
        grads.append(policy.model.lm_head.weight.grad)
    torch.testing.assert_close(compiled.logprobs(batch), plain.logprobs(batch), rtol=0, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
