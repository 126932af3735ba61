"""Token-budget micro-batches packed without padding, and the LM head in chunks: both are the
padded, unchunked computation to fp32 tolerance (logprobs, entropy, loss, gradients), with the
step's normalisers unchanged."""

from __future__ import annotations

import pytest
import torch

from grpo.batch import Batch, Rollout, build_batch
from grpo.data import Completion
from grpo.loss import GRPOLoss
from grpo import packing
from grpo.packing import PACKED_ATTENTION, budget_slices, micro_batches, pack
from grpo.policy import Policy

FP32 = {"rtol": 1e-5, "atol": 2e-6}


def varied_batch(policy: Policy, multi_turn: bool = False) -> Batch:
    """2 prompts of different lengths x 3 completions of 0-9 tokens; with `multi_turn`, env
    tokens inside the completions (Completion.mask 0) as an episode's tool replies are."""
    gen = torch.Generator().manual_seed(0)
    prompts = [policy.encode_chat([{"role": "user", "content": text}])
               for text in ("Count on from 7:", "Count on from 1234567, slowly please:")]
    groups = []
    for lengths in ((9, 3, 0), (5, 8, 1)):
        group = []
        for n in lengths:
            ids = torch.randint(3, 500, (n,), generator=gen).tolist()
            mask = [1] * n
            if multi_turn and n >= 5:
                mask[2:4] = [0, 0]
            group.append(Completion(ids, torch.randn(n, generator=gen).mul(0.1).sub(3).tolist(), "", "length",
                                    mask=mask))
        groups.append(group)
    advantages = torch.randn(2, 3, generator=gen)
    return build_batch(Rollout([None, None], prompts, groups), advantages, policy.pad_id)


@pytest.fixture(scope="module")
def policy(tiny_model_path):
    return Policy(tiny_model_path, temperature=0.7)


def test_budget_slices_keep_order_fill_greedily_and_send_a_long_row_alone():
    assert budget_slices([3, 4, 2, 9, 1, 1], 7) == [slice(0, 2), slice(2, 3), slice(3, 4), slice(4, 6)]
    assert budget_slices([5], 2) == [slice(0, 1)]  # over the budget: alone, never dropped
    assert budget_slices([], 4) == []


def test_pack_restarts_positions_and_predicts_each_completion_token(policy):
    batch = varied_batch(policy)
    layout = pack(batch.input_ids, batch.attention_mask, batch.prompt_len)
    lengths = batch.attention_mask.sum(-1)
    assert layout.input_ids.shape == (1, int(lengths.sum()))  # no padding left
    assert (layout.position_ids[0] == 0).sum() == batch.size  # one restart per row
    # Every completion token, and nothing else, is a target, in the padded layout's places.
    expected = batch.input_ids[:, batch.prompt_len:][batch.attention_mask[:, batch.prompt_len:].bool()]
    torch.testing.assert_close(layout.targets, expected, rtol=0, atol=0)


@pytest.mark.parametrize("loss_type, multi_turn", [("dapo", False), ("grpo", True)])
@pytest.mark.parametrize("budget, chunk", [(40, None), (None, 4), (1000, 4)])
def test_packed_and_chunked_equal_padded_logprobs_entropy_loss_and_grads(policy, loss_type, multi_turn, chunk, budget):
    """Budget 40 puts 1-2 rows in each micro-batch (one long row alone), 1000 all six in one;
    chunks of 4 positions split every row's completion. Normalisers: DAPO's token mean over the
    whole step and GRPO's sequence mean, which must come from the full batch however the rows are
    grouped. The entropy's gradient is checked through a step-wide token mean of it (the loss's
    own entropy bonus is a mean per micro-batch, so it moves with the grouping by design)."""
    batch = varied_batch(policy, multi_turn)
    loss = GRPOLoss(loss_type=loss_type)
    num_items = batch.completion_mask.sum()

    def run(max_tokens, chunk_tokens):
        policy.model.zero_grad(set_to_none=True)
        policy.logprob_chunk_tokens = chunk_tokens
        logps, entropies, total = [], [], 0.0
        for micro in micro_batches(batch, 2, max_tokens):
            logp, entropy = policy.logprobs_and_entropy(micro, grad=True)
            out = loss(logp, logp.detach(), micro.sampling_logp, None, micro.advantages, micro.completion_mask,
                       num_items_in_batch=num_items, entropy=entropy, batch_rows=batch.size)
            mask = micro.completion_mask
            weighted = out.loss * loss.micro_weight(micro.size, batch.size)
            (weighted - 0.01 * (entropy * mask).sum() / num_items).backward()
            total += weighted.item()
            logps.append(logp.detach() * mask)
            entropies.append(entropy.detach() * mask)
        grads = {n: p.grad.clone() for n, p in policy.model.named_parameters()}
        return torch.cat(logps), torch.cat(entropies), total, grads

    try:
        reference = run(None, None)  # today's: padded rows, whole logits
        got = run(budget, chunk)
    finally:
        policy.logprob_chunk_tokens = None
    torch.testing.assert_close(got[0], reference[0], **FP32)
    torch.testing.assert_close(got[1], reference[1], **FP32)
    assert got[2] == pytest.approx(reference[2], rel=1e-5, abs=1e-7)
    for name, grad in reference[3].items():
        torch.testing.assert_close(got[3][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_and_packed_without_grad_give_the_old_and_reference_logprobs(policy):
    """The no-grad forwards (old / reference logprobs) go through the same layouts."""
    batch = varied_batch(policy, multi_turn=True)
    mask = batch.completion_mask
    with torch.no_grad():
        padded = policy.logprobs(batch) * mask
        policy.logprob_chunk_tokens = 3
        try:
            packed = torch.cat([policy.logprobs(m) for m in micro_batches(batch, 2, 50)]) * mask
        finally:
            policy.logprob_chunk_tokens = None
    torch.testing.assert_close(packed, padded, **FP32)


def test_packed_attention_runs_rows_padded_without_a_mask_and_other_attentions_fall_back(tiny_model_path,
                                                                                        monkeypatch):
    """On sdpa a packed forward attends as rows x L, never building transformers' [T, T] mask
    (3.2 s against 0.07 s a layer at 45 x 90 tokens); on another attention transformers derives
    its block-diagonal mask from the position ids, slower and just as exact."""
    policy = Policy(tiny_model_path)
    assert policy.model.config._attn_implementation == PACKED_ATTENTION
    batch = varied_batch(policy, multi_turn=True)
    micro = next(micro_batches(batch, 2, 1000))  # all six rows in one sequence
    seen, real = [], packing.sdpa_attention_forward
    monkeypatch.setattr(packing, "sdpa_attention_forward",
                        lambda module, q, k, v, mask, **kw: seen.append((tuple(q.shape), mask)) or real(module, q, k, v, mask, **kw))
    with torch.no_grad():
        packed = policy.logprobs(micro)
    longest = int(batch.attention_mask.sum(-1).max())
    assert seen and all(shape[0] == 6 and shape[2] == longest and mask is None for shape, mask in seen)
    policy.model.set_attn_implementation("eager")
    with torch.no_grad():
        fallback = policy.logprobs(micro)
    torch.testing.assert_close(fallback * micro.completion_mask, packed * micro.completion_mask, **FP32)


def test_lora_packs_and_chunks_the_same(tiny_model_path):
    """Under PEFT the decoder and head are found through the wrapper (adapters in the decoder)."""
    from runtime.config import LoraConfig

    policy = Policy(tiny_model_path, lora=LoraConfig())
    for p in policy.trainable_parameters():  # B starts at 0: move it so the adapter counts
        torch.nn.init.normal_(p, std=0.02)
    batch = varied_batch(policy, multi_turn=True)
    mask = batch.completion_mask
    expected = policy.logprobs(batch) * mask
    policy.logprob_chunk_tokens = 4
    got = torch.cat([policy.logprobs(m) for m in micro_batches(batch, 2, 40)]) * mask
    torch.testing.assert_close(got, expected, **FP32)


@pytest.mark.heavy
def test_a_compiled_decoder_packs_and_chunks_the_same(tiny_model_path):
    """hardware.compile compiles the decoder, which both layouts and the chunked head go through:
    under tracing transformers always builds the packed mask from the position ids."""
    plain, compiled = Policy(tiny_model_path), Policy(tiny_model_path, compile=True, logprob_chunk_tokens=4)
    batch = varied_batch(plain, multi_turn=True)
    mask = batch.completion_mask
    expected = plain.logprobs(batch) * mask
    (expected.sum()).backward()
    got = torch.cat([compiled.logprobs(m) for m in micro_batches(batch, 2, 40)]) * mask
    got.sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.model.lm_head.weight.grad, plain.model.lm_head.weight.grad,
                               rtol=1e-4, atol=1e-5)
