"""Supervised warm start, the algorithm's part: cross-entropy on the answer tokens only.

A prompt (chat template applied, `encode_chat`) and its reference answer (the env's, as it grades
it, then EOS) become one row of the same `Batch` GRPO trains on (prompt left-padded, answer
right-padded), so the loss reads the same `Policy.logprobs` as GRPO's: the model a warm start
leaves is the model GRPO then scores, token for token. The prompt's tokens carry no loss.
"""

from __future__ import annotations

import torch

from grpo.batch import Batch, Rollout, build_batch
from grpo.data import Completion, Prompt
from grpo.policy import Policy, completion_logits, gathered_logprobs


def answer_ids(policy: Policy, answer: str) -> list[int]:
    """The answer's token ids as the model must emit them: its text, then EOS (<|im_end|>)."""
    return policy.tokenizer(answer, add_special_tokens=False).input_ids + [policy.tokenizer.eos_token_id]


def answer_batch(policy: Policy, prompts: list[Prompt], answers: list[str]) -> Batch:
    """One row per (prompt, answer): the prompt's chat ids ++ the answer's ids (EOS included);
    `completion_mask` is 1 on the answer tokens, the only ones the loss counts."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    groups = [[Completion(ids, [0.0] * len(ids), text, "stop")]
              for text, ids in ((a, answer_ids(policy, a)) for a in answers)]
    rollout = Rollout(prompts, [policy.encode_chat(p.messages) for p in prompts], groups)
    return build_batch(rollout, torch.zeros(len(prompts), 1), policy.pad_id)


def answer_loss(policy: Policy, batch: Batch) -> tuple[torch.Tensor, dict]:
    """Mean negative log-likelihood per answer token (at temperature 1, under the policy's compute
    precision, one forward as GRPO's), and its metrics: `loss`, `token_accuracy` (share of answer
    tokens the model ranks first) and `answer_exact` (share of rows whose every answer token it
    ranks first: what greedy decoding would emit, teacher-forced)."""
    input_ids, mask = batch.input_ids.to(policy.device), batch.completion_mask.to(policy.device)
    targets = input_ids[:, batch.prompt_len:]
    with policy.compute_context():
        logits = completion_logits(policy.model, input_ids, batch.attention_mask.to(policy.device), batch.prompt_len)
        logp, _ = gathered_logprobs(logits, targets)
    tokens = mask.sum().clamp(min=1)
    loss = -(logp * mask).sum() / tokens
    right = (logits.detach().argmax(-1) == targets).float()
    exact = (right * mask + (1 - mask)).prod(-1)  # padding counts as right
    return loss, {"loss": loss.item(), "token_accuracy": float((right * mask).sum() / tokens),
                  "answer_exact": float(exact.mean())}
