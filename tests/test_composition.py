"""finetune x sync x hardware (x model) compose freely: every combination either plans a run (its
bridge and its server's command line, nothing started: lab/compose.py `plan`) or is refused at
start with the one sentence its bridge declares (`Bridge.capabilities`)."""

from __future__ import annotations

import itertools

import pytest

from bridges.base import Bridge
from bridges.broadcast_gloo import GlooBroadcastBridge
from bridges.broadcast_nccl import NcclBroadcastBridge
from bridges.legacy import LegacyBridge
from bridges.lora import LoraBridge
from bridges.reload import ReloadBridge
from bridges.shared import SharedBridge
from conftest import REPO, make_cfg
from lab.compose import Refused, check, plan

GROUPS = {g: sorted(p.stem for p in (REPO / "conf" / g).glob("*.yaml"))
          for g in ("finetune", "sync", "hardware", "model")}

# What is refused, by (finetune, sync, hardware); the message's start (the rest is the reason).
SHARED_LORA = "sync=shared cannot run finetune=lora: the trainer's parameters are vLLM's tensors, so a merged adapter"
FULL_ADAPTER = "sync=adapter cannot run finetune=full: full fine-tuning has no adapter to hot-swap"
SHARED_APART = "sync=shared cannot run with vLLM on GPUs of its own (hardware.vllm_devices=1): the trainer's parameters"
SHARED_PROCS = "sync=shared cannot run with {} trainer processes: it trains vLLM's single copy of the weights"


def expected(finetune: str, sync: str, hardware: str):
    """The bridge class a combination runs with, or the start of its refusal."""
    if sync == "adapter":
        return LoraBridge if finetune == "lora" else FULL_ADAPTER
    if sync == "shared":
        if finetune == "lora":
            return SHARED_LORA
        return {"gpu_split": SHARED_APART, "gpu_node": SHARED_PROCS.format(4),
                "multi_node": SHARED_PROCS.format(16)}.get(hardware, SharedBridge)
    if sync == "broadcast":
        return NcclBroadcastBridge if hardware == "gpu_split" else GlooBroadcastBridge
    return {"reload": ReloadBridge, "legacy": LegacyBridge}[sync]


def test_every_group_option_is_covered():
    assert GROUPS["finetune"] == ["full", "lora"]
    assert GROUPS["sync"] == ["adapter", "broadcast", "legacy", "reload", "shared"]


@pytest.mark.parametrize("combo", list(itertools.product(*GROUPS.values())), ids=lambda c: "-".join(c))
def test_every_combination_plans_or_is_refused_with_its_reason(combo, tmp_path):
    finetune, sync, hardware, model = combo
    cfg = make_cfg(*(f"{g}={o}" for g, o in zip(GROUPS, combo)))
    want = expected(finetune, sync, hardware)
    if isinstance(want, str):
        with pytest.raises(Refused) as err:
            plan(cfg, tmp_path)
        assert str(err.value).startswith(want), err.value
        assert not (tmp_path / "vllm.log").exists()
        return
    planned = plan(cfg, tmp_path, path="unused")  # the model's path only goes on the server's command line
    assert type(planned.bridge) is want
    assert not planned.server.external or hardware == "multi_node"
    args = planned.server.args
    assert ("--enable-lora" in args) == (sync == "adapter")
    assert ("--weight-transfer-config" in args) == (want is NcclBroadcastBridge)
    # LoRA over every sync but adapter is served merged: rollouts ask for the base model's name.
    assert planned.bridge.served_model == ("policy-lora" if sync == "adapter" else None)
    assert cfg.optimizer.lr == (cfg.model.lora_lr if finetune == "lora" else make_cfg(f"model={model}").optimizer.lr)


def test_every_bridge_declares_a_reason_for_each_refusal():
    """A capability a bridge lacks is a sentence (the refusal quotes it), never a bare flag."""
    for bridge in (Bridge, ReloadBridge, LegacyBridge, LoraBridge, SharedBridge, GlooBroadcastBridge,
                   NcclBroadcastBridge):
        caps = vars(bridge.capabilities)
        for name, why in caps.items():
            if name != "model_from_server":
                assert why is None or (isinstance(why, str) and len(why.split()) >= 5), (bridge, name)


@pytest.mark.parametrize("overrides, message", [
    (("sync=shared", "hardware.vllm_tp=2"), "sync=shared cannot run with vLLM TP=2 x DP=1: a TP shard or a DP replica"),
    (("sync=broadcast", "hardware=gpu", "hardware.collective=nccl"),
     "sync=broadcast cannot run with vLLM on the trainer device (cuda:0): NCCL moves weights GPU to GPU"),
    (("sync=broadcast", "hardware=gpu_node", "hardware.collective=nccl"),
     "sync=broadcast cannot run with 4 trainer processes: vLLM's NCCL engine is opened by trainer rank 0 alone"),
    (("sync=legacy", "train.max_staleness=1"), "sync=legacy cannot run with train.max_staleness=1: every sync restarts"),
    (("sync=shared", "server.base_url=http://10.0.0.1:8000", "server.api_key=k"),
     "sync=shared cannot run with vLLM on another machine (server.base_url=http://10.0.0.1:8000)"),
])
def test_what_a_bridge_cannot_serve_is_refused_with_its_reason(overrides, message):
    with pytest.raises(Refused) as err:
        check(make_cfg(*overrides))
    assert str(err.value).startswith(message), err.value


def test_lora_without_the_models_rate_is_refused_not_trained_at_the_full_rate():
    """finetune=lora takes model.lora_lr; a model without one is refused unless optimizer.lr is given."""
    with pytest.raises(Refused, match=r"finetune=lora: this model has no LoRA learning rate \(model.lora_lr\)"):
        check(make_cfg("finetune=lora", "model.lora_lr=null"))
    assert make_cfg("finetune=lora", "model.lora_lr=null", "optimizer.lr=3e-3").optimizer.lr == 3e-3
    check(make_cfg("finetune=lora", "model.lora_lr=null", "optimizer.lr=3e-3"))
    assert make_cfg("finetune=full", "model.lora_lr=null").optimizer.lr == 2e-4  # full fine-tuning needs none


def test_the_lora_rate_is_the_models_and_the_command_line_wins():
    assert make_cfg("mode=lora").optimizer.lr == 1e-2  # conf/model/tiny.yaml model.lora_lr
    assert make_cfg("finetune=lora", "sync=broadcast").optimizer.lr == 1e-2
    assert make_cfg("mode=lora", "model=qwen2.5-0.5b-instruct").optimizer.lr == 1e-5
    assert make_cfg("mode=lora", "optimizer.lr=3e-3").optimizer.lr == 3e-3
    assert make_cfg("mode=reload").optimizer.lr == 2e-4


@pytest.mark.parametrize("sync", GROUPS["sync"])
def test_the_probe_tolerance_is_every_syncs_and_follows_the_dtype_unless_set(sync):
    finetune = "finetune=lora" if sync == "adapter" else "finetune=full"
    assert check(make_cfg(f"sync={sync}", finetune)).probe_tolerance is None  # set at setup from the precision
    assert check(make_cfg(f"sync={sync}", finetune, "sync.probe_tolerance=0.02")).probe_tolerance == 0.02


def test_token_budgets_and_the_chunked_head_are_checked_by_key():
    """A budget no episode of this env can fit is refused naming the key; the chunked LM head is
    refused beside FSDP (several trainer processes), which gathers the head only in its forward."""
    check(make_cfg("train.max_tokens_per_micro_batch=17"))  # Digits samples at most 16 tokens: just fits
    with pytest.raises(Refused, match=r"train.max_tokens_per_micro_batch=64 does not hold the 256 tokens"):
        check(make_cfg("env=gsm8k", "train.max_tokens_per_micro_batch=64"))
    check(make_cfg("train.logprob_chunk_tokens=128"))
    with pytest.raises(Refused, match=r"train.logprob_chunk_tokens=128 with 2 trainer processes"):
        check(make_cfg("train.logprob_chunk_tokens=128", "hardware.trainer_procs=2"))
