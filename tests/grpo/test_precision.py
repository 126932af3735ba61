"""Precision: which dtype the trainer's weights, its compute and vLLM each use, and the one
tolerance every trainer-vs-vLLM comparison takes from it (the probe's included)."""

from __future__ import annotations

import pytest
import torch

from grpo.batch import Rollout, build_batch
from grpo.policy import Policy
from grpo.precision import (Precision, autocast_dtype, bf16_spacing, cpu_bf16_native, logprob_tolerance, run_rtol,
                            served_dtype, warn_if_update_rounds_away)
from grpo.data import Completion

F32, BF16 = torch.float32, torch.bfloat16


def test_auto_follows_native_bf16_support():
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_bf16_native() == native
    assert autocast_dtype("auto", torch.device("cpu")) == (BF16 if native else None)
    assert autocast_dtype(None, torch.device("cpu")) is None
    assert autocast_dtype("bfloat16", torch.device("cpu")) == BF16
    with pytest.raises(ValueError, match="hardware.autocast='bf16'"):
        autocast_dtype("bf16", torch.device("cpu"))


@pytest.mark.parametrize("dtype, master, autocast, expected", [
    ("float32", "float32", None, (F32, F32, F32)),
    ("float32", "float32", "bfloat16", (F32, BF16, F32)),  # bf16 compute against an fp32 server
    ("bfloat16", "float32", None, (F32, BF16, BF16)),  # mixed precision: fp32 masters, bf16 compute and served
    ("bfloat16", "float32", "auto", (F32, BF16, BF16)),
    ("bfloat16", "bfloat16", None, (BF16, BF16, BF16)),  # pure bf16
])
def test_resolve(dtype, master, autocast, expected):
    p = Precision.resolve(dtype, master, autocast)
    assert (p.master, p.compute, p.served) == expected
    assert p.mixed == (expected[0] != expected[2])
    assert p.autocast == (expected[1] if expected[1] != expected[0] else None)
    assert Precision.from_dict(p.to_dict()) == p


def test_auto_autocast_is_this_cpus_choice():
    p = Precision.resolve("float32", "float32", "auto")
    assert p.compute == (BF16 if cpu_bf16_native() else F32)
    assert p.to_dict()["cpu_bf16_native"] == cpu_bf16_native()  # the run's `precision` event says which CPU


def test_bad_dtypes_name_their_key():
    with pytest.raises(ValueError, match="model.master_dtype=bfloat16 is narrower than model.dtype=float32"):
        Precision.resolve("float32", "bfloat16")
    with pytest.raises(ValueError, match="model.master_dtype='fp32'"):
        Precision.resolve("float32", "fp32")


def test_tolerances_follow_the_coarsest_dtype():
    assert logprob_tolerance(F32, F32) == 1e-3
    assert logprob_tolerance(F32, BF16) == logprob_tolerance(BF16) == 0.3
    assert run_rtol(F32) == 1e-5 and run_rtol(BF16, F32) == 1e-2
    fp32, autocast = Precision.resolve("float32"), Precision.resolve("float32", autocast="bfloat16")
    assert fp32.gap_tolerance == fp32.probe_tolerance == 1e-3
    # bf16 compute vs an fp32 server: the step's logprob gap is a bf16 gap, the probe stays fp32.
    assert autocast.gap_tolerance == 0.3 and autocast.probe_tolerance == 1e-3
    assert Precision.resolve("bfloat16").probe_tolerance == 0.3


def test_bfloat16_autocast_computes_in_bf16_and_keeps_fp32_weights(tiny_model_path):
    fp32, bf16 = Policy(tiny_model_path), Policy(tiny_model_path, Precision.resolve("float32", autocast="bfloat16"))
    prompt_ids = fp32.encode_chat([{"role": "user", "content": "Count on from 3:"}])
    completion = Completion([40, 41, 42, 300, 7], [0.0] * 5, "", "length")
    batch = build_batch(Rollout([None], [prompt_ids], [[completion]]), torch.zeros(1, 1), fp32.pad_id)
    exact, rounded = fp32.logprobs(batch), bf16.logprobs(batch)
    gap = (exact - rounded).abs().max().item()
    assert 1e-5 < gap < bf16.precision.gap_tolerance  # bf16 rounding shows, and stays within the tolerance
    assert all(p.dtype == F32 for p in bf16.model.parameters())
    rounded.sum().backward()
    assert all(p.grad.dtype == F32 for p in bf16.model.parameters() if p.grad is not None)
    # vLLM serves fp32 here: the probe computes at the weights' own precision, exactly.
    ids = prompt_ids + [40, 41, 42]
    assert bf16.probe_logprobs(ids) == fp32.probe_logprobs(ids)


def test_mixed_precision_keeps_fp32_masters_and_probes_at_bf16(tiny_model_path):
    fp32, mixed = Policy(tiny_model_path), Policy(tiny_model_path, Precision.resolve("bfloat16"))
    assert all(p.dtype == F32 for p in mixed.model.parameters())
    ids = fp32.encode_chat([{"role": "user", "content": "Count on from 3:"}]) + [40, 41, 42]
    gap = max(abs(a - b) for a, b in zip(fp32.probe_logprobs(ids), mixed.probe_logprobs(ids)))
    assert 1e-5 < gap < mixed.precision.probe_tolerance


def test_fp32_master_weights_take_updates_that_bf16_rounds_away():
    """The issue's measurement: AdamW at lr 1e-6 on a N(0, 0.02) weight changes ~2 % of bf16
    entries in 3 steps, every fp32 one."""
    torch.manual_seed(0)
    init = torch.randn(512, 512) * 0.02
    changed = {}
    for dtype in (F32, BF16):
        w = torch.nn.Parameter(init.to(dtype, copy=True))
        opt = torch.optim.AdamW([w], lr=1e-6, weight_decay=0.0)
        for _ in range(3):
            w.grad = torch.randn_like(w)
            opt.step()
        changed[dtype] = (w.detach().float() != init.to(dtype).float()).float().mean().item()
    assert changed[F32] > 0.99 and changed[BF16] < 0.05


def test_pure_bf16_warns_when_lr_rounds_away():
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256).to(BF16)
    torch.nn.init.normal_(model.weight, std=0.02)
    assert bf16_spacing(0.0135) == 2.0 ** -14  # 0.0135 in [2^-7, 2^-6): 8 bits below 2^-7
    with pytest.warns(UserWarning, match="optimizer.lr=1e-06 is below half the bfloat16 spacing"):
        assert warn_if_update_rounds_away(model, 1e-6, BF16)
    assert warn_if_update_rounds_away(model, 1e-3, BF16) is None
    assert warn_if_update_rounds_away(model.float(), 1e-6, F32) is None


def test_auto_serves_bf16_where_it_is_native_and_keeps_fp32_masters():
    from conftest import make_cfg

    cfg = make_cfg()  # `python train.py`: model.dtype=auto, model.master_dtype=auto
    assert (cfg.model.dtype, cfg.model.master_dtype) == ("auto", "auto")
    native = cpu_bf16_native()
    assert served_dtype("auto", "cpu") == (BF16 if native else F32)
    p = Precision.resolve(cfg.model.dtype, cfg.model.master_dtype, cfg.hardware.autocast, "cpu")
    assert (p.master, p.compute, p.served) == ((F32, BF16, BF16) if native else (F32, F32, F32))
    assert make_cfg("model=qwen2.5-0.5b-instruct").model.dtype == "bfloat16"  # a preset says what it serves


def test_a_sync_that_trains_vllms_tensors_takes_their_dtype_as_masters():
    assert Precision.resolve("bfloat16", "auto", shared_by="shared") == Precision(BF16, BF16, BF16)
    assert Precision.resolve("float32", "auto", shared_by="shared") == Precision(F32, F32, F32)
    with pytest.raises(ValueError, match="sync=shared trains vLLM's own bfloat16 tensors, so there is no float32 "
                                         "master copy to keep: set model.master_dtype=bfloat16"):
        Precision.resolve("bfloat16", "float32", shared_by="shared")


@pytest.mark.slow
def test_an_attached_server_says_what_it_serves(vllm_server):
    """The session server serves fp32: auto takes it, an explicit other dtype is refused by key."""
    from conftest import make_cfg
    from lab.server import served_dtype_name, build_server

    def attached(*overrides):
        cfg = make_cfg(f"server.base_url={vllm_server.base_url}", *overrides)
        return cfg, build_server(cfg, None, model="m")

    assert vllm_server.served_dtype() == "float32"
    assert served_dtype_name(*attached()) == "float32"
    with pytest.raises(ValueError, match=r"model.dtype=bfloat16, but the server at http://127\.0\.0\.1:\d+ serves "
                                         r"float32: set model.dtype=float32 or auto"):
        served_dtype_name(*attached("model.dtype=bfloat16"))
