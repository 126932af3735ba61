"""Tied embeddings (Qwen2.5's layout, `model.tiny.tie_word_embeddings=true`) through real runs:
`save_pretrained` leaves the tied lm_head out of the file, and the mirror used to compare it with
the state dict (which has it), so every sync rewrote the whole model. Now every sync after the
first rewrites the same file in place, writing exactly the tensors the step changed (all of them
in mode=reload; the merged LoRA targets only in mode=lora), while vLLM serves the trainer's
logprobs (fp32 both sides on every CPU: model.dtype=float32, hardware.autocast=null) and has moved off the previous weights."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from conftest import PROBE_TOL, make_cfg, restore_pristine
from runtime.config import LoraConfig
from lab.server import build_server
from runtime.records import read_jsonl
from support import QUIET
from lab.loop import train
from lab.server import model_path

pytestmark = pytest.mark.slow

TIED = ("model.tiny.tie_word_embeddings=true", "model.dtype=float32", "hardware.autocast=null")


@pytest.fixture(scope="module")
def tied_server(tmp_path_factory):
    path = model_path(make_cfg(*TIED))
    server = build_server(make_cfg(*TIED), tmp_path_factory.mktemp("vllm-tied"), model=path).start()
    try:
        yield server, path
    finally:
        server.stop()


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("mode", ["reload", "lora"])
def test_tied_syncs_after_the_first_write_only_the_trained_tensors(tied_server, mode, tmp_path):
    server, path = tied_server
    restore_pristine(server, path)
    base = AutoModelForCausalLM.from_pretrained(path)
    assert base.config.tie_word_embeddings and base.lm_head.weight is base.model.embed_tokens.weight
    if mode == "reload":  # every parameter trains; the tied one is written once
        trained = nbytes(base.parameters())
    else:  # the merge changes only the adapted linear layers
        trained = nbytes(m.weight for name, m in base.named_modules()
                         if name.rsplit(".", 1)[-1] in LoraConfig().target_modules)
    train(make_cfg(f"mode={mode}", *TIED, "train.steps=3", f"server.base_url={server.base_url}", *QUIET), tmp_path)

    syncs = read_jsonl(tmp_path / "sync.jsonl")
    assert [s["step"] for s in syncs] == [1, 2, 3]
    full = syncs[0]["bytes"]  # the first: a full save
    assert full > nbytes(base.parameters())
    assert [s["bytes"] for s in syncs[1:]] == [trained, trained] and trained < full
    for s in syncs:
        assert s["probe_max_diff"] <= PROBE_TOL, s
        assert s["extra"]["served_moved"] > 1e-2, s  # vLLM no longer serves the previous weights
    restore_pristine(server, path)
