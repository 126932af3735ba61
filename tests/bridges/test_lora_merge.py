"""finetune=lora's merged syncs (mode=lora: sync=reload), the adapter merged into the base
weights and pushed: the merged tensors are exactly PEFT's `merge_and_unload` (tied and untied embeddings), the trainer's model
is left as it was, vLLM then serves the trainer's adapter-enabled logprobs (<= 1e-3 over the
probe) from plain weights, `mode=lora` picks the sync and its server flags by config, and the
merged weights go every way a full model goes (reload, broadcast, legacy runs learn)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hydra.utils import instantiate
from transformers import AutoModelForCausalLM

from bridges.lora import LoraBridge
from bridges.lora_merge import MergedLora, merged_state_dict
from bridges.reload import ReloadBridge
from conftest import PROBE_TOL as TOL
from conftest import make_cfg, restore_pristine, run_precision
from lab.loop import train
from runtime.config import LoraConfig
from grpo.policy import Policy
from serving.client import VLLMClient
from support import bump_adapter
from lab.server import model_path

RUN = ("log.wandb.mode=disabled", "log.progress=false", "log.samples_every=10")


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def any_tiny_path(request) -> str:
    return model_path(make_cfg(f"model.tiny.tie_word_embeddings={str(request.param).lower()}"))


def test_merged_state_dict_is_peft_merge_and_unload(any_tiny_path):
    policy = Policy(any_tiny_path, lora=LoraConfig())
    bump_adapter(policy, 0)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    probe = policy.encode_chat([{"role": "user", "content": "Count on from 5:"}]) + [20, 21, 22]
    adapted = policy.probe_logprobs(probe)

    merged = merged_state_dict(policy.model)
    expected = copy.deepcopy(policy.model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], atol=0, rtol=0, msg=key)
    # Every LoRA target moved; the trainer's tensors (base weights and adapter) did not.
    targets = [k for k in merged if k.endswith(".weight") and k.rsplit(".", 2)[-2] in LoraConfig().target_modules]
    base = AutoModelForCausalLM.from_pretrained(any_tiny_path).state_dict()
    assert len(targets) == 7 * 2 and all((merged[k] - base[k]).abs().max() > 1e-3 for k in targets)
    for key, value in policy.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert policy.probe_logprobs(probe) == adapted


def test_kept_buffers_follow_the_adapter(tiny_model_path):
    policy = Policy(tiny_model_path, lora=LoraConfig())
    merger = MergedLora(policy.model)
    for seed in (1, 2):  # the second merge reuses the first one's buffers
        bump_adapter(policy, seed)
        merged = merger.state_dict()
        expected = copy.deepcopy(policy.model).merge_and_unload().state_dict()
        for key in expected:
            torch.testing.assert_close(merged[key], expected[key], atol=0, rtol=0, msg=key)


def test_merged_weights_compute_the_adapters_logprobs(tiny_model_path):
    policy = Policy(tiny_model_path, lora=LoraConfig())
    bump_adapter(policy, 1)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    plain.load_state_dict(merged_state_dict(policy.model))
    ids = torch.tensor([policy.encode_chat([{"role": "user", "content": "Count on from 7:"}]) + [20, 21]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, policy.model(ids).logits, atol=1e-5, rtol=0)
        with policy.reference_context():  # the KL reference is still the base, adapter off
            torch.testing.assert_close(policy.model(ids).logits,
                                       AutoModelForCausalLM.from_pretrained(tiny_model_path)(ids).logits)


@pytest.mark.parametrize("sync,bridge,lora_flags", [
    ([], ReloadBridge, False),
    (["sync=reload"], ReloadBridge, False),
    (["sync=adapter"], LoraBridge, True),
])
def test_mode_lora_picks_its_sync_and_server_flags(sync, bridge, lora_flags):
    cfg = make_cfg("mode=lora", *sync)
    assert cfg.finetune.name == "lora" and cfg.finetune.lora.r == 16
    built = instantiate(cfg.sync.bridge)
    assert type(built) is bridge
    assert ("--enable-lora" in built.server_args()) == lora_flags
    assert ("VLLM_ALLOW_RUNTIME_LORA_UPDATING" in built.server_env()) == lora_flags


def test_mode_lora_carries_a_learning_rate_that_learns_and_the_cli_wins():
    default = make_cfg().optimizer.lr
    assert make_cfg("mode=lora").optimizer.lr == 1e-2 != default  # conf/model/tiny.yaml model.lora_lr
    assert make_cfg("mode=lora", "sync=adapter").optimizer.lr == 1e-2
    assert make_cfg("mode=lora", "optimizer.lr=3e-3").optimizer.lr == 3e-3
    assert make_cfg("mode=reload").optimizer.lr == default


@pytest.mark.slow
def test_merged_sync_serves_trainer_adapter_as_plain_weights(vllm_server, tiny_model_path, tmp_path):
    policy = Policy(tiny_model_path, lora=LoraConfig())
    bridge = ReloadBridge(probe_tolerance=TOL)  # a LoRA policy: Weights merges the adapter
    client = VLLMClient(vllm_server, "policy")
    restore_pristine(vllm_server, tiny_model_path)
    try:
        bridge.setup(policy, vllm_server, client, tmp_path)
        bridge.ensure_synced()  # B = 0: the merged model is the base, nothing to push
        for step, seed in ((1, 1), (2, 2)):
            bump_adapter(policy, seed)
            assert bridge.probe_diff() > 1e-2
            stats = bridge.sync(step)
            assert (stats.finetune, stats.sync) == ("lora", "reload") and stats.probe_max_diff <= TOL
            assert client.model == "policy"  # the served model itself, no adapter named
            assert stats.bytes > 1_000_000  # full weights, not an adapter
        with policy.reference_context():  # vLLM no longer serves the base
            base = policy.probe_logprobs(bridge.probe_ids)
        assert max(abs(a - b) for a, b in zip(client.prompt_logprobs(bridge.probe_ids), base)) > 1e-2
    finally:
        restore_pristine(vllm_server, tiny_model_path)


def read_syncs(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "sync.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lora_over_broadcast_run_learns_on_merged_weights(attach, tmp_path):
    """`python train.py finetune=lora sync=broadcast`: the merged weights over the gloo collective
    (no --enable-lora), learning as `mode=lora` does (chance at step 1, >= 0.8 over the last 4)."""
    history = train(make_cfg("finetune=lora", "sync=broadcast", attach, "train.steps=12", *RUN), tmp_path)
    assert history[0]["reward_mean"] < 0.3
    assert min(m["reward_mean"] for m in history[-4:]) >= 0.8
    syncs = read_syncs(tmp_path)
    assert len(syncs) == 12
    assert all((s["finetune"], s["sync"]) == ("lora", "broadcast") and s["bytes"] > 1_000_000  # full weights
               and s["probe_max_diff"] <= run_precision(tmp_path).probe_tolerance for s in syncs)


@pytest.mark.slow
@pytest.mark.heavy
def test_lora_over_legacy_run_learns_on_merged_weights(tmp_path):
    """`python train.py finetune=lora sync=legacy sync.sync_every=4`: vLLM restarted on the merged
    weights (a server start per sync, so few syncs); rollouts after a sync show the learning."""
    history = train(make_cfg("finetune=lora", "sync=legacy", "sync.sync_every=4", "train.steps=12", *RUN), tmp_path)
    syncs = read_syncs(tmp_path)
    assert [s["step"] for s in syncs] == [4, 8, 12]
    assert all((s["finetune"], s["sync"]) == ("lora", "legacy") for s in syncs)
    assert history[0]["reward_mean"] < 0.3
    assert min(m["reward_mean"] for m in history[-4:]) >= 0.5
