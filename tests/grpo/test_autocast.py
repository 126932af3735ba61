"""hardware.autocast: bf16 compute with fp32 master weights, only where it was asked for or is native."""

from __future__ import annotations

import pytest
import torch

from grpo.batch import Rollout, build_batch
from grpo.policy import Policy, autocast_dtype
from serving.client import Completion


def test_auto_follows_native_bf16_support():
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert autocast_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else None)
    assert autocast_dtype(None, torch.device("cpu")) is None
    assert autocast_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="hardware.autocast='bf16'"):
        autocast_dtype("bf16", torch.device("cpu"))


def test_bfloat16_autocast_computes_in_bf16_and_keeps_fp32_weights(tiny_model_path):
    fp32, bf16 = Policy(tiny_model_path), Policy(tiny_model_path, autocast="bfloat16")
    prompt_ids = fp32.encode_chat([{"role": "user", "content": "Count on from 3:"}])
    completion = Completion([40, 41, 42, 300, 7], [0.0] * 5, "", "length")
    batch = build_batch(Rollout([None], [prompt_ids], [[completion]]), torch.zeros(1, 1), fp32.pad_id)
    exact, rounded = fp32.logprobs(batch), bf16.logprobs(batch)
    gap = (exact - rounded).abs().max().item()
    assert 1e-5 < gap < 0.1  # bf16 rounding shows, and stays small
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    rounded.sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in bf16.model.parameters() if p.grad is not None)
