"""The configured optimizer: fused AdamW by default (TRL's default too), same update as foreach."""

import torch
from hydra.utils import instantiate

from tests.conftest import make_cfg


def _step(opt_cfg, fused: bool) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 32))
    opt = instantiate(opt_cfg, [w], fused=fused)
    for _ in range(3):
        opt.zero_grad()
        (w.sin().sum() + w.square().mean()).backward()
        opt.step()
    return w.detach()


def test_fused_adamw_is_the_default_and_matches_foreach():
    cfg = make_cfg()
    opt = instantiate(cfg.optimizer, [torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    fused, foreach = _step(cfg.optimizer, True), _step(cfg.optimizer, False)
    torch.manual_seed(0)
    assert (fused - torch.randn(64, 32)).abs().max() > 1e-4  # the steps moved the weights
    torch.testing.assert_close(fused, foreach, rtol=1e-5, atol=1e-6)
