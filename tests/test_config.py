"""Every config composes, and bad input fails at start with the bad key or value named."""

from __future__ import annotations

import itertools

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import REPO, make_cfg
from train import check_loss_config, open_run

GROUPS = {g: sorted(p.stem for p in (REPO / "conf" / g).glob("*.yaml")) for g in ("model", "mode", "env", "hardware")}


@pytest.mark.parametrize("combo", list(itertools.product(*GROUPS.values())), ids=lambda c: "-".join(c))
def test_every_combination_composes(combo):
    cfg = make_cfg(*(f"{g}={o}" for g, o in zip(GROUPS, combo)))
    assert cfg.mode.name == combo[1]
    assert cfg.env._target_.startswith("envs.")
    assert cfg.mode.bridge._target_.startswith("bridges.")


def test_unknown_key_is_named():
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg("train.lr_typo=1")
    assert "lr_typo" in str(err.value.__cause__ or err.value)


def test_wrong_type_is_named():
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        make_cfg("train.steps=many")
    assert "steps" in str(err.value.__cause__ or err.value)


def test_unknown_group_option_lists_choices():
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg("mode=teleport")
    assert "teleport" in str(err.value) and "reload" in str(err.value)


@pytest.mark.parametrize("key,value", [("loss.loss_type", "ppo2"), ("loss.scale_rewards", "median"),
                                       ("loss.is_level", "batch"), ("loss.is_mode", "clip")])
def test_bad_loss_option_fails_at_start(key, value):
    cfg = make_cfg(f"{key}={value}")
    with pytest.raises(ValueError, match=value):
        check_loss_config(cfg)


def test_missing_data_file_fails_before_server_start(tmp_path):
    cfg = make_cfg("env=gsm8k", "env.source=../shared/data/no_such_dir")
    with pytest.raises(Exception) as err:
        with open_run(cfg, tmp_path):
            pass
    assert "no_such_dir" in str(err.value)
    assert not (tmp_path / "vllm.log").exists()  # failed before vLLM was started


def test_unknown_env_kwarg_is_named(tmp_path):
    cfg = make_cfg("+env.shuffle_typo=1")
    with pytest.raises(Exception) as err:
        with open_run(cfg, tmp_path):
            pass
    assert "shuffle_typo" in str(err.value)
