"""bf16 trains in every mode (CPU): `train()` with model.dtype=bfloat16, vLLM serving bf16 too.

Every sync passes the probe at the bf16 tolerance (bridges/base.py PROBE_TOLERANCE) while its gap
shows bf16 arithmetic (> 1e-4; fp32 gives ~1e-6), the loss stays finite and the reward rises.
reload, lora and broadcast share one bf16 server; shared starts its own (the trainer's parameters
are its weights) and legacy restarts its own at every sync, so legacy gets 2 steps and one sync,
after its last rollout: its reward cannot move yet, the sync and the loss are what it proves.
"""

from __future__ import annotations

import math

import pytest
import torch

from bridges.base import PROBE_TOLERANCE
from conftest import make_cfg, restore_pristine
from test_train import read_jsonl
from train import train

pytestmark = pytest.mark.slow

BF16 = ("model.dtype=bfloat16", "log.wandb.mode=disabled", "log.progress=false", "log.samples_every=100")
# (overrides, steps, attach to the shared bf16 server)
CASES = {
    "reload": (("mode=reload",), 4, True),
    "lora": (("mode=lora", "optimizer.lr=1e-2"), 4, True),
    "broadcast": (("mode=broadcast",), 4, True),
    "shared": (("mode=shared",), 4, False),
    "legacy": (("mode=legacy", "mode.sync_every=2"), 2, False),
}


@pytest.fixture(scope="module")
def bf16_server(tiny_model_path, tmp_path_factory):
    """A bf16 vLLM server on the tiny model, started with mode=lora's flags so LoRA can attach."""
    from bridges.lora import LoraBridge
    from serving.server import server_from_config

    lora = LoraBridge()
    server = server_from_config(make_cfg("mode=reload", *BF16), tiny_model_path, tmp_path_factory.mktemp("vllm-bf16"),
                                extra_args=lora.server_args(), extra_env=lora.server_env())
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
    assert all(1e-4 < s["probe_max_diff"] <= PROBE_TOLERANCE[torch.bfloat16] for s in syncs), syncs
    assert all(math.isfinite(m["loss"]) for m in history)
    rewards = [m["reward_mean"] for m in history]
    assert rewards[-1] > rewards[0] or mode == "legacy", rewards
