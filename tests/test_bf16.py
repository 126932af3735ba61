"""bf16 trains in every mode (CPU): `train()` with model.dtype=bfloat16 is mixed precision: fp32
master weights and optimizer state in the trainer, bf16 compute (autocast), vLLM serving bf16.

Every sync passes the probe at the bf16 tolerance (grpo/precision.py) while its gap shows bf16
arithmetic (> 1e-4; fp32 gives ~1e-6), the loss stays finite and the reward rises. mode=shared
trains vLLM's own bf16 tensors, so it runs pure bf16 (model.master_dtype=bfloat16) and refuses
mixed precision at start.
reload, lora and broadcast share one bf16 server; shared starts its own (the trainer's parameters
are its weights) and legacy restarts its own at every sync, so legacy gets 2 steps and one sync,
after its last rollout: its reward cannot move yet, the sync and the loss are what it proves.
"""

from __future__ import annotations

import math

import pytest
import torch

from safetensors.torch import load_file

from conftest import make_cfg, restore_pristine, run_precision
from runtime.records import read_jsonl
from lab.loop import train

pytestmark = pytest.mark.slow

BF16 = ("model.dtype=bfloat16", "log.wandb.mode=disabled", "log.progress=false", "log.samples_every=100")
# (overrides, steps, attach to the shared bf16 server)
CASES = {
    "reload": (("mode=reload",), 4, True),
    "lora": (("mode=lora", "optimizer.lr=1e-2"), 4, True),
    "broadcast": (("mode=broadcast",), 4, True),
    "shared": (("mode=shared", "model.master_dtype=bfloat16"), 4, False),
    "legacy": (("mode=legacy", "sync.sync_every=2"), 2, False),
}


@pytest.fixture(scope="module")
def bf16_server(tiny_model_path, tmp_path_factory):
    """A bf16 vLLM server on the tiny model, started with mode=lora's flags so LoRA can attach."""
    from bridges.lora import LoraBridge
    from lab.server import build_server

    lora = LoraBridge()
    server = build_server(make_cfg("mode=reload", *BF16), tmp_path_factory.mktemp("vllm-bf16"), bridge=lora,
                      model=tiny_model_path)
    server.start()
    yield server
    server.stop()


# CI trains bf16 with reload; the other modes repeat it on their own bridges (pytest -m heavy).
@pytest.mark.parametrize("mode", [m if m == "reload" else pytest.param(m, marks=pytest.mark.heavy) for m in CASES])
def test_a_bf16_run_trains(mode, request, tiny_model_path, tmp_path):
    overrides, steps, attached = CASES[mode]
    if attached:
        server = request.getfixturevalue("bf16_server")
        restore_pristine(server, tiny_model_path)  # LoRA needs the base model under its adapter
        overrides += (f"server.base_url={server.base_url}",)
    history = train(make_cfg(*BF16, *overrides, f"train.steps={steps}"), tmp_path)

    syncs = read_jsonl(tmp_path / "sync.jsonl")
    assert [s["step"] for s in syncs] == ([2] if mode == "legacy" else list(range(1, steps + 1)))
    precision = run_precision(tmp_path)
    assert precision.served == precision.compute == torch.bfloat16
    assert precision.master == (torch.bfloat16 if mode == "shared" else torch.float32)
    assert all(1e-4 < s["probe_max_diff"] <= precision.probe_tolerance for s in syncs), syncs
    assert all(math.isfinite(m["loss"]) for m in history)
    rewards = [m["reward_mean"] for m in history]
    assert rewards[-1] > rewards[0] or mode == "legacy", rewards


def changed_fraction(path, initial: dict, dtype: torch.dtype) -> dict[str, float]:
    """Per trained matrix of the checkpoint at `path` (saved in `dtype`): the share of entries
    unlike `initial`'s in that dtype."""
    final = load_file(f"{path}/model.safetensors")
    assert all(t.dtype == dtype for t in final.values())  # the master weights, as TRL saves them
    return {name: (final[name] != t.to(dtype)).float().mean().item()
            for name, t in initial.items() if t.dim() == 2 and "embed_tokens" not in name}


@pytest.mark.parametrize("master", ["float32", pytest.param("bfloat16", marks=pytest.mark.heavy)])
def test_fp32_masters_take_an_update_that_bf16_weights_round_away(master, bf16_server, tiny_model_path, tmp_path):
    """lr 1e-6: one AdamW step moves every weight of every trained matrix by ~1e-6. fp32 masters
    keep all of it (final/ holds them); pure bf16 weights (spacing ~1e-4 at |w| ~ 0.02) keep
    almost none. Embeddings are left out: rows of tokens never seen get no gradient."""
    restore_pristine(bf16_server, tiny_model_path)
    initial = load_file(f"{tiny_model_path}/model.safetensors")
    overrides = (*BF16, "mode=reload", f"model.master_dtype={master}", "optimizer.lr=1e-6", "train.steps=1",
                 "eval.enabled=false", f"server.base_url={bf16_server.base_url}")
    if master == "bfloat16":
        with pytest.warns(UserWarning, match="optimizer.lr=1e-06 is below half the bfloat16 spacing"):
            train(make_cfg(*overrides), tmp_path)
    else:
        train(make_cfg(*overrides), tmp_path)
    fractions = changed_fraction(tmp_path / "final", initial, getattr(torch, master))
    assert len(fractions) == 2 * 7 + 1, fractions  # 7 linear layers a block, and lm_head
    if master == "float32":
        assert min(fractions.values()) >= 0.99, fractions
    else:
        assert max(fractions.values()) < 0.1, fractions
    # vLLM serves the masters cast to bf16: the probe matched them at the bf16 tolerance.
    syncs = read_jsonl(tmp_path / "sync.jsonl")
    assert len(syncs) == 1 and syncs[0]["probe_max_diff"] <= run_precision(tmp_path).probe_tolerance
    assert syncs[0]["bytes"] < 0.6 * sum(t.numel() * 4 for t in initial.values())  # bf16 moved, not fp32


def test_shared_refuses_fp32_masters_over_bf16_weights(tmp_path):
    with pytest.raises(ValueError, match="sync=shared trains vLLM's own bfloat16 tensors.*model.master_dtype=bfloat16"):
        train(make_cfg(*BF16, "mode=shared", "model.master_dtype=float32", "train.steps=1"), tmp_path)
