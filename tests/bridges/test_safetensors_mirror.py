"""The reload bridge's checkpoint dir rewritten in place equals a fresh save_pretrained."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bridges.safetensors_mirror import SafetensorsMirror


def saved(out) -> dict[str, torch.Tensor]:
    return {k: v for path in sorted(out.glob("*.safetensors")) for k, v in load_file(path).items()}


def test_second_write_copies_in_place_and_reads_back_exactly(tiny_model_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    mirror = SafetensorsMirror(tmp_path / "sync")
    assert mirror.write(model, model.state_dict()) is False  # first: a full save
    inode = (tmp_path / "sync" / "model.safetensors").stat().st_ino
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    assert mirror.write(model, model.state_dict()) is True
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
    assert mirror.write(model, state) is False
    assert saved(tmp_path / "sync")[name].shape == (3, 5)
    mirror.close()
