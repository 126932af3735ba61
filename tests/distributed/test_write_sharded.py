"""The layout a sharded model is written into: laid out from names, dtypes and shapes alone, then
filled bucket by bucket; what safetensors (and so vLLM and from_pretrained) reads back."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from bridges.safetensors_mirror import SafetensorsMirror, write_sharded
from runtime import distributed


def test_buckets_fill_a_file_laid_out_from_shapes(tmp_path, tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    state["extra.half"] = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)  # a second dtype, odd size
    mirror = SafetensorsMirror(tmp_path / "out")
    buckets = list(distributed.full_buckets(state, bucket_bytes=100_000))
    assert len(buckets) > 3 and all(b for b in buckets)  # several buckets, the model never in one
    write_sharded(mirror, model.config, state, bucket_bytes=100_000)
    mirror.close()
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert saved.keys() == state.keys()
    for name, tensor in state.items():
        assert saved[name].dtype == tensor.dtype and torch.equal(saved[name], tensor), name
    assert AutoConfig.from_pretrained(tmp_path / "out").hidden_size == model.config.hidden_size
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_a_second_write_goes_in_place(tmp_path, tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    state = dict(model.state_dict())
    mirror = SafetensorsMirror(tmp_path / "out")
    write_sharded(mirror, model.config, state, bucket_bytes=1 << 20)
    inode = (tmp_path / "out" / "model.safetensors").stat().st_ino
    state = {name: t + 1 for name, t in state.items()}
    write_sharded(mirror, model.config, state, bucket_bytes=1 << 20)
    mirror.close()
    assert (tmp_path / "out" / "model.safetensors").stat().st_ino == inode
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["lm_head.weight"], state["lm_head.weight"])
