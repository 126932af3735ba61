"""The reload bridge's checkpoint dir rewritten in place equals a fresh save_pretrained, and a
rewrite copies exactly the changed tensors' bytes, tied embeddings (Qwen2.5's layout) included."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bridges.lora_merge import MergedLora
from bridges.safetensors_mirror import SafetensorsMirror, distinct
from conftest import make_cfg
from runtime.config import LoraConfig
from grpo.policy import Policy
from support import bump_adapter
from lab.server import model_path


def saved(out) -> dict[str, torch.Tensor]:
    return {k: v for path in sorted(out.glob("*.safetensors")) for k, v in load_file(path).items()}


def test_second_write_copies_in_place_and_reads_back_exactly(tiny_model_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    mirror = SafetensorsMirror(tmp_path / "sync")
    full = mirror.write(model, model.state_dict())  # first: a full save
    assert mirror.in_place is False and full == (tmp_path / "sync" / "model.safetensors").stat().st_size
    inode = (tmp_path / "sync" / "model.safetensors").stat().st_ino
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    assert mirror.write(model, model.state_dict()) == nbytes(model.state_dict()) < full
    assert mirror.in_place is True
    assert (tmp_path / "sync" / "model.safetensors").stat().st_ino == inode  # same file, new bytes
    fresh = model.state_dict()
    back = saved(tmp_path / "sync")
    assert back.keys() == fresh.keys()
    for name, tensor in fresh.items():
        assert torch.equal(back[name], tensor), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sync")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), fresh.values()))
    mirror.close()


def test_a_changed_shape_falls_back_to_a_full_save(tiny_model_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    mirror = SafetensorsMirror(tmp_path / "sync")
    mirror.write(model, model.state_dict())
    state = dict(model.state_dict())
    name = next(iter(state))
    state[name] = torch.zeros(3, 5)
    mirror.write(model, state)
    assert mirror.in_place is False
    assert saved(tmp_path / "sync")[name].shape == (3, 5)
    mirror.close()


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.fixture(scope="module")
def tied_path() -> str:
    return model_path(make_cfg("model.tiny.tie_word_embeddings=true"))


def test_tied_embeddings_are_rewritten_in_place(tied_path, tmp_path):
    """save_pretrained leaves the tied lm_head.weight out of the file; the state dict has it."""
    model = AutoModelForCausalLM.from_pretrained(tied_path)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    assert distinct(state).keys() == state.keys() - {"lm_head.weight"}
    mirror = SafetensorsMirror(tmp_path / "sync")
    full = mirror.write(model, state)
    assert "lm_head.weight" not in saved(tmp_path / "sync") and not mirror.in_place
    inode = (tmp_path / "sync" / "model.safetensors").stat().st_ino
    for seed in (1, 2):  # every write after the first: in place, the changed tensors' bytes only
        torch.manual_seed(seed)
        with torch.no_grad():
            model.model.embed_tokens.weight.add_(torch.randn_like(model.model.embed_tokens.weight))
            model.model.norm.weight.add_(1.0)
        written = mirror.write(model, model.state_dict())
        assert mirror.in_place and (tmp_path / "sync" / "model.safetensors").stat().st_ino == inode
        assert written == nbytes({"e": model.model.embed_tokens.weight, "n": model.model.norm.weight}) < full
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "sync")
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    mirror.close()


def test_a_lora_merge_rewrites_only_the_targeted_modules(tied_path, tmp_path):
    policy = Policy(tied_path, lora=LoraConfig())
    merged = MergedLora(policy.model)
    mirror = SafetensorsMirror(tmp_path / "sync")
    full = mirror.write(policy.base_model, merged.state_dict())
    targets = {k: t for k, t in merged.state_dict().items() if k in merged.layers}
    assert len(targets) == 7 * 2  # q k v o gate up down, two layers
    for seed in (1, 2):
        bump_adapter(policy, seed)
        state = merged.state_dict()
        assert mirror.write(policy.base_model, state) == nbytes(targets) < full
        assert mirror.in_place
    back = saved(tmp_path / "sync")
    for name, tensor in distinct(state).items():
        assert torch.equal(back[name], tensor), name
    mirror.close()
