"""finetune=lora over sync=adapter (`mode=lora sync=adapter`) against the real vLLM server: adapters
hot-swap in place, vLLM then serves the trainer's PEFT model (max |dlogprob| over the probe
<= 1e-3), saved adapters load with plain PEFT, and bad LoRA settings fail at start by name."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from bridges.lora import LoraBridge
from conftest import PROBE_TOL as TOL
from conftest import make_cfg, restore_pristine
from runtime.config import LoraConfig
from grpo.policy import Policy
from serving.client import VLLMClient
from lab.run import open_run
from support import bump_adapter


def lora_policy(path, **overrides) -> Policy:
    return Policy(path, lora=LoraConfig(**overrides))


def test_only_adapter_trains_and_base_is_the_reference(tiny_model_path):
    policy = lora_policy(tiny_model_path)
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("down_proj" in n for n in trainable)
    policy.load_reference()
    assert policy.reference is None and policy.reference_model is policy.model  # no second model
    bump_adapter(policy, 0)
    ids = policy.encode_chat([{"role": "user", "content": "Count on from 5:"}]) + [20, 21, 22]
    base = Policy(tiny_model_path).probe_logprobs(ids)
    with policy.reference_context():
        ref = policy.probe_logprobs(ids)
    torch.testing.assert_close(torch.tensor(ref), torch.tensor(base), atol=1e-5, rtol=0)
    assert max(abs(a - b) for a, b in zip(policy.probe_logprobs(ids), base)) > 1e-2


@pytest.mark.slow
def test_lora_hot_swap_serves_trainer_adapter_and_saves_peft_loadable(vllm_server, tiny_model_path, tmp_path):
    policy = lora_policy(tiny_model_path)
    bridge = LoraBridge(probe_tolerance=TOL)
    client = VLLMClient(vllm_server, bridge.served_model)  # rollouts name the adapter, as build() gives them
    restore_pristine(vllm_server, tiny_model_path)  # the adapter goes on the base model's own weights
    bridge.setup(policy, vllm_server, client, tmp_path)
    bridge.initial_sync(None)  # always a push: vLLM must hold the adapter rollouts name
    assert client.model == "policy-lora"
    for step, seed in ((1, 1), (2, 2)):  # first sync loads, the second replaces in place
        bump_adapter(policy, seed)
        assert bridge.probe_diff() > 1e-2
        stats = bridge.sync(step)
        assert stats.probe_max_diff <= TOL and (stats.finetune, stats.sync) == ("lora", "adapter")
        assert 10_000 < stats.bytes < 10_000_000  # adapter only, not the model
    # The saved adapter is plain PEFT: it reproduces the trainer's logprobs.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapters" / "step-000002"))
    ids = bridge.probe_ids
    with torch.no_grad():
        a = loaded(torch.tensor([ids])).logits
        b = policy.model(torch.tensor([ids])).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_rank_above_server_max_fails_at_start(tmp_path):
    cfg = make_cfg("mode=lora", "sync=adapter", "finetune.lora.r=128", "finetune.lora.max_lora_rank=64")
    assert cfg.sync.bridge.max_lora_rank == 64  # the server's flag follows the LoRA settings
    with pytest.raises(ValueError, match=r"finetune.lora.r=128.*max-lora-rank"):
        with open_run(cfg, tmp_path):
            pass
    assert not (tmp_path / "vllm.log").exists()


def test_unknown_target_module_fails_at_start(tmp_path):
    cfg = make_cfg("mode=lora", "finetune.lora.target_modules=[q_proj,attn_qkv]")
    with pytest.raises(ValueError, match=r"attn_qkv.*linear modules are"):
        with open_run(cfg, tmp_path):
            pass
    assert not (tmp_path / "vllm.log").exists()
