"""LR schedules against hand-computed factors (the lr of each training step, 0-based)."""

import math

import pytest
import torch

from grpo.schedule import lr_factor, warmup_schedule


def lrs(decay: str, total: int = 10, warmup: int = 2, min_lr_ratio: float = 0.0, base: float = 1.0) -> list[float]:
    """The lr each of `total` steps runs with, read off a real optimizer and scheduler."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = warmup_schedule(optimizer, total, decay=decay, warmup_steps=warmup, min_lr_ratio=min_lr_ratio)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_constant_with_warmup_ramps_then_holds():
    assert lrs("constant", warmup=4) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_no_warmup_starts_at_the_full_lr():
    assert lrs("constant", warmup=0)[0] == 1.0 and lrs("linear", warmup=0)[0] == 1.0


def test_linear_decay_after_warmup():
    # warmup 2 of 10: 1/2, 1, then 1 - (s - 2)/8 for s = 2..9.
    assert lrs("linear") == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_cosine_decay_after_warmup():
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    got = lrs("cosine")
    assert got == pytest.approx(expected)
    assert got[6] == pytest.approx(0.5)  # half-way through the decay
    assert got[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))  # 0.0381


def test_min_lr_ratio_is_the_floor_and_scales_with_the_base_lr():
    got = lrs("linear", min_lr_ratio=0.1, base=2e-4)
    assert got[2] == pytest.approx(2e-4)
    assert got[6] == pytest.approx(2e-4 * (0.1 + 0.9 * 0.5))
    assert lr_factor(100, total_steps=10, decay="cosine", warmup_steps=2, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_state_dict_round_trip_continues_the_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    first = warmup_schedule(opt, 10, decay="cosine", warmup_steps=2)
    for _ in range(5):
        opt.step()
        first.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    second = warmup_schedule(opt2, 10, decay="cosine", warmup_steps=2)
    second.load_state_dict(first.state_dict())
    assert second.get_last_lr() == pytest.approx(first.get_last_lr())
    assert second.get_last_lr()[0] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 8)))


def test_unknown_decay_is_named():
    with pytest.raises(ValueError, match="'step'"):
        warmup_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 10, decay="step")
