"""The supervised warm start (lab/sft.py, grpo/sft.py): the loss counts the answer tokens only, a
few steps on env=arith lower it, and the model it writes gives the trainer's logprobs in HF and in
vLLM. The cached warm start (model=tiny_arith) and GRPO from it: tests/test_arith.py."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from conftest import PROBE_TOL, make_cfg, restore_pristine
from envs.base import references
from envs.synthetic import DigitsEnv
from grpo.policy import Policy
from grpo.sft import answer_batch, answer_ids, answer_loss
from lab import final
from lab.sft import train_sft
from runtime.config import SFTConfig
from serving.client import VLLMClient
from support import HF_TOL, hf_probe, max_diff, probe_ids


@pytest.fixture
def arith():
    env = instantiate(make_cfg("env=arith").env)
    yield env
    env.close()


def test_the_batch_is_the_prompt_then_the_reference_and_eos(tiny_model_path, arith):
    policy = Policy(tiny_model_path)
    prompts = arith.sample(3)
    answers = references(arith, prompts)
    assert answers[0] == f"<answer>{prompts[0].answer}</answer>"
    batch = answer_batch(policy, prompts, answers)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        want = answer_ids(policy, answer)
        assert want[-1] == policy.tokenizer.eos_token_id
        n = int(batch.completion_mask[row].sum())
        assert batch.input_ids[row, batch.prompt_len:batch.prompt_len + n].tolist() == want
        prompt_ids = policy.encode_chat(prompt.messages)
        assert batch.input_ids[row, batch.prompt_len - len(prompt_ids):batch.prompt_len].tolist() == prompt_ids


def test_the_loss_counts_the_answer_tokens_only(tiny_model_path, arith):
    """Changing a prompt token changes the logits the answer is read from but adds no term of its
    own: the loss is the mean NLL of the answer tokens, as computed by hand."""
    policy = Policy(tiny_model_path)
    prompts = arith.sample(4)
    batch = answer_batch(policy, prompts, references(arith, prompts))
    loss, metrics = answer_loss(policy, batch)
    logp = policy.logprobs(batch)
    mask = batch.completion_mask
    assert loss.item() == pytest.approx(float(-(logp.detach() * mask).sum() / mask.sum()), rel=1e-4)
    assert 0 <= metrics["token_accuracy"] <= 1 and 0 <= metrics["answer_exact"] <= 1
    loss.backward()
    assert all(p.grad is not None for p in policy.trainable_parameters() if p.requires_grad)


def test_an_env_without_reference_answers_is_refused_by_name(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match="DigitsEnv gives no reference answers"):
        train_sft(Policy(tiny_model_path), DigitsEnv(), SFTConfig(steps=1, eval_prompts=2), tmp_path, progress=False)


def test_sft_lowers_the_loss_and_its_model_loads_in_hf_and_vllm(tiny_model_path, arith, tmp_path, vllm_server):
    """30 steps of SFT on env=arith from the default tiny model: the loss falls, metrics.jsonl,
    eval.jsonl (pass@1 before and after) and sft.json are written, and final/ gives the trainer's
    probe logprobs in HF and in the session vLLM server (reload_weights from it)."""
    policy = Policy(tiny_model_path)
    summary = train_sft(policy, arith, SFTConfig(steps=30, batch_size=32, lr=3e-3, warmup_steps=5, eval_prompts=16),
                        tmp_path, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 30] and 0 <= summary["pass@1"] <= 1
    out = final.save(policy, tmp_path)
    ids = probe_ids(policy)
    trainer = policy.probe_logprobs(ids)  # at the served precision: the fp32 master weights here
    assert max_diff(hf_probe(out, ids), trainer) <= HF_TOL
    client = VLLMClient(vllm_server, model="policy")
    try:
        restore_pristine(vllm_server, str(out))
        vllm_server.post("/reset_prefix_cache")
        assert max_diff(client.prompt_logprobs(ids), trainer) <= PROBE_TOL  # the session server serves fp32
        restore_pristine(vllm_server, tiny_model_path)
        vllm_server.post("/reset_prefix_cache")
        assert max_diff(client.prompt_logprobs(ids), trainer) > 10 * PROBE_TOL  # SFT moved the weights
    finally:
        restore_pristine(vllm_server, tiny_model_path)
    assert torch.isfinite(torch.tensor(losses)).all()
