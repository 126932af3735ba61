"""The metrics that explain a run, on numbers worked out by hand: policy entropy on the sampled
tokens, the fraction of completions cut at max_tokens, the fraction of groups with no learning
signal, completion lengths; then a real train step (no server) writes them all, and its samples
reach the wandb table of an offline run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_cfg
from grpo.data import Prompt
from grpo import token_scores as scores_module
from grpo.advantages import group_advantages
from grpo.batch import Rollout, build_batch
from grpo.policy import Policy, token_entropy
from grpo.data import Completion
from runtime.records import read_jsonl
from support import QUIET, serverless_run
from lab.loop import optimize, train_step


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    return token_entropy(logits, logits.logsumexp(-1))


def test_entropy_of_known_distributions():
    # Uniform over 350 tokens: ln 350. Probabilities (3/4, 1/4): -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.5623.
    # One token 50 nats above the others: 0 to float precision.
    two = torch.tensor([math.log(3.0), 0.0])
    peaked = torch.zeros(350)
    peaked[7] = 50.0
    logits = torch.stack([torch.full((350,), 2.5), torch.nn.functional.pad(two, (0, 348), value=-1e4), peaked])
    got = entropy_of(logits.view(1, 3, 350))[0]
    assert got.tolist() == pytest.approx([math.log(350), 0.5623351446, 0.0], abs=1e-5)


def test_entropy_in_chunks_equals_torchs_and_keeps_no_graph(monkeypatch):
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 1000) * 3).requires_grad_()
    expected = torch.distributions.Categorical(logits=logits.detach()).entropy()  # 2.5-3.1 nats
    whole = entropy_of(logits)  # 15 rows in one chunk
    monkeypatch.setattr(scores_module, "ENTROPY_CHUNK_ELEMENTS", 4000)  # 4 rows of 1000 at a time: 4 chunks
    got = entropy_of(logits)
    torch.testing.assert_close(got, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)  # fp32 sums over 1000 terms
    assert not got.requires_grad


def test_policy_entropy_comes_from_the_training_forward_at_the_sampling_temperature(tiny_model_path):
    """Same logprobs as `Policy.logprobs` (with their gradient), and the entropy of the
    temperature-scaled distribution at every completion position."""
    policy = Policy(tiny_model_path, temperature=0.7)
    prompt = policy.encode_chat([{"role": "user", "content": "Count on from 7:"}])
    completion = [40, 41, 42, 300, 7]
    batch = build_batch(Rollout([None], [prompt], [[Completion(completion, [0.0] * 5, "", "length")]]),
                        torch.zeros(1, 1), policy.pad_id)
    logp, entropy = policy.logprobs_and_entropy(batch)
    assert logp.requires_grad and not entropy.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(logp, policy.logprobs(batch), rtol=0, atol=0)
        logits = policy.model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1]
    expected = torch.distributions.Categorical(logits=logits / 0.7).entropy()
    torch.testing.assert_close(entropy[0], expected, rtol=0, atol=1e-5)
    at_one = torch.distributions.Categorical(logits=logits).entropy()
    assert (entropy[0] - at_one).abs().max() > 0.01  # the temperature changes these numbers
    # For the entropy bonus: the same numbers, with a gradient that reaches the weights.
    logp_grad, trained = policy.logprobs_and_entropy(batch, grad=True)
    torch.testing.assert_close(trained.detach(), entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(logp_grad.detach(), logp.detach(), rtol=0, atol=0)
    trained.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())


def completion(n: int, finish: str) -> Completion:
    return Completion(list(range(10, 10 + n)), [-1.0] * n, "x" * n, finish)


def test_lengths_truncation_and_tied_groups():
    """Four groups of three: all equal (tied); one differs (signal); two NaN and one reward (nothing
    to compare: tied); a NaN between two different rewards (signal). 2 of 4 groups tie."""
    nan = math.nan
    rewards = torch.tensor([[0.5, 0.5, 0.5], [0.0, 1.0, 0.0], [nan, 0.3, nan], [1.0, nan, 0.0]])
    lengths = [[3, 8, 8], [0, 5, 8], [1, 2, 8], [4, 4, 4]]
    groups = [[completion(n, "length" if n == 8 else "stop") for n in row] for row in lengths]
    rollout = Rollout([Prompt([], "")] * 4, [[1]] * 4, groups, rewards)
    assert rollout.completion_metrics() == pytest.approx({
        "completion_len_min": 0.0, "completion_len_mean": 55 / 12, "completion_len_max": 8.0,
        "truncated_frac": 4 / 12, "tied_group_frac": 0.5})
    # The tied groups are exactly those whose advantages are all 0.
    advantages = group_advantages(rewards, "group")
    assert (advantages == 0).all(dim=1).tolist() == [True, False, True, False]


def test_a_train_step_reports_the_metrics_and_the_entropy_of_its_batch(tmp_path, tiny_model_path):
    """optimize()'s entropy is the token mean over the batch's sampled tokens of the policy that
    the step starts from (FakeClient: 4 tokens per completion, all cut at max_tokens)."""
    run = serverless_run(tmp_path, tiny_model_path, make_cfg(*QUIET, "train.micro_batch_size=3"))
    rollout = run.sampler.generate(1)
    run.sampler.score(rollout)
    batch = build_batch(rollout, group_advantages(rollout.rewards, "group"), run.policy.pad_id)
    with torch.no_grad():
        logits = run.policy.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    per_token = torch.distributions.Categorical(logits=logits[:, batch.prompt_len - 1:-1]).entropy()
    expected = ((per_token * batch.completion_mask).sum() / batch.completion_mask.sum()).item()
    metrics = optimize(run, batch, 1)  # micro-batches of 3, 3, 2 rows
    assert metrics["entropy"] == pytest.approx(expected, abs=1e-5)
    assert 4.0 < expected < math.log(logits.shape[-1])  # a random tiny model: near uniform

    step = train_step(run, 2)
    run.logger.close()
    assert step["truncated_frac"] == 1.0
    assert step["completion_len_min"] == step["completion_len_mean"] == step["completion_len_max"] == 4.0
    assert step["tied_group_frac"] == 1.0  # FakeClient's completions are all "12ab": every group ties
    assert f"| ent {step['entropy']:.2f} |" in run.logger.line(2, step)


def test_samples_reach_an_offline_wandb_table(tmp_path, tiny_model_path):
    cfg = make_cfg(*QUIET, "log.wandb.mode=offline", "log.samples_every=1")
    run = serverless_run(tmp_path, tiny_model_path, cfg)
    metrics = train_step(run, 1)
    run.logger.step(1, metrics)
    run.logger.close()
    samples = read_jsonl(tmp_path / "samples.jsonl")
    assert len(samples) == 8 and all("advantage" in s for s in samples)
    tables = list(tmp_path.glob("wandb/offline-run-*/files/media/table/samples_*.table.json"))
    assert len(tables) == 1, list(tmp_path.rglob("*table*"))
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "answer", "completion", "reward", "advantage"]
    assert [row[5] for row in table["data"]] == pytest.approx([s["advantage"] for s in samples])
    assert [row[4] for row in table["data"]] == pytest.approx([s["reward"] for s in samples])


def test_the_silent_logger_answers_every_call_the_run_logger_takes():
    """Ranks > 0 log through SilentLogger: a RunLogger method it lacks would fail only there."""
    import inspect

    from runtime.logger import RunLogger, SilentLogger

    def calls(cls):
        return {name: inspect.signature(f) for name, f in vars(cls).items()
                if inspect.isfunction(f) and not name.startswith("_")}

    assert calls(SilentLogger) == calls(RunLogger)
