"""Every config composes, and bad input fails at start with the bad key or value named."""

from __future__ import annotations

import itertools

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from conftest import REPO, make_cfg
from runtime.config import validate
from lab.run import open_run

GROUPS = {g: sorted(p.stem for p in (REPO / "conf" / g).glob("*.yaml")) for g in ("model", "mode", "env", "hardware")}


# mode=<m> presets: what each sets the two groups to (every command of before the split still runs)
PRESETS = {"reload": ("full", "reload"), "legacy": ("full", "legacy"), "lora": ("lora", "reload"),
           "shared": ("full", "shared"), "broadcast": ("full", "broadcast")}


@pytest.mark.parametrize("combo", list(itertools.product(*GROUPS.values())), ids=lambda c: "-".join(c))
def test_every_combination_composes(combo):
    cfg = make_cfg(*(f"{g}={o}" for g, o in zip(GROUPS, combo)))
    validate(cfg)  # the shipped defaults are in range
    assert (cfg.finetune.name, cfg.sync.name) == PRESETS[combo[1]]
    assert cfg.name == "-".join(PRESETS[combo[1]])
    assert cfg.env._target_.startswith("envs.")
    assert cfg.sync.bridge._target_.startswith("bridges.")


def test_a_preset_yields_to_the_group_named_on_the_command_line():
    """`mode=lora sync=adapter` (once `mode=lora mode/lora_sync=adapter`): LoRA, hot-swapped."""
    cfg = make_cfg("mode=lora", "sync=adapter")
    assert (cfg.finetune.name, cfg.sync.name, cfg.sync.bridge._target_) == ("lora", "adapter", "bridges.lora.LoraBridge")
    assert make_cfg("mode=legacy", "sync.sync_every=10").sync.sync_every == 10


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


def fails_at_start(tmp_path, *overrides: str) -> str:
    """The error `python train.py <overrides>` stops with; asserts vLLM was never started."""
    with pytest.raises(Exception) as err:
        with open_run(make_cfg(*overrides), tmp_path):
            pass
    assert not (tmp_path / "vllm.log").exists(), "failed only after vLLM was started"
    return str(err.value)


# Every numeric option out of range, and every bad choice, fails before vLLM starts, by its key.
BAD = [
    ("train.group_size=1", "train.group_size"),  # GRPO: one sample per prompt -> every advantage 0
    ("train.prompts_per_step=0", "train.prompts_per_step"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("train.max_tokens_per_micro_batch=0", "train.max_tokens_per_micro_batch"),
    ("train.max_tokens_per_micro_batch=16", "train.max_tokens_per_micro_batch"),  # Digits samples 16: no room for a prompt
    ("train.logprob_chunk_tokens=0", "train.logprob_chunk_tokens"),
    ("train.steps=0", "train.steps"),
    ("train.num_iterations=0", "train.num_iterations"),
    ("train.max_grad_norm=0", "train.max_grad_norm"),
    ("train.checkpoint_every=-1", "train.checkpoint_every"),
    ("optimizer.lr=0", "optimizer.lr"),
    ("optimizer.lr=-0.001", "optimizer.lr"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay"),
    ("scheduler.warmup_steps=-1", "scheduler.warmup_steps"),
    ("scheduler.decay=step", "scheduler.decay"),
    ("scheduler.min_lr_ratio=1.5", "scheduler.min_lr_ratio"),
    ("rollout.max_tokens=-5", "rollout.max_tokens"),
    ("rollout.max_tokens=0", "rollout.max_tokens"),
    ("rollout.temperature=0", "rollout.temperature"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.top_p=1.2", "rollout.top_p"),
    ("advantage.scale_rewards=median", "advantage.scale_rewards"),
    ("loss.loss_type=ppo2", "loss.loss_type"),
    ("loss.is_level=batch", "loss.is_level"),
    ("loss.is_mode=clip", "loss.is_mode"),
    ("loss.epsilon_low=-0.1", "loss.epsilon_low"),
    ("loss.epsilon_high=-0.2", "loss.epsilon_high"),
    ("loss.is_cap=0.5", "loss.is_cap"),
    ("loss.beta=-0.04", "loss.beta"),  # was silently ignored: only beta > 0 added the KL term
    ("loss.loss_type=cispo", "loss.epsilon_high"),  # cispo's cap 0.2 would cut on-policy tokens
    ("loss.delta=1.1", "loss.delta"),
    ("loss.top_entropy_quantile=0", "loss.top_entropy_quantile"),
    ("loss.importance_sampling_level=batch", "loss.importance_sampling_level"),
    ("advantage.estimator=ppo", "advantage.estimator"),
    ("overlong.weight=-1", "overlong.weight"),
    ("overlong.cache=0", "overlong.cache"),
    ("advantage.estimator=reinforce_pp", "advantage.scale_rewards"),  # no group std without a group baseline
    ("sync.sync_every=0", "sync.sync_every"),
    ("model.max_model_len=0", "model.max_model_len"),
    ("hardware.vllm_tp=0", "hardware.vllm_tp"),
    ("hardware.gpu_memory_utilization=1.5", "hardware.gpu_memory_utilization"),
    ("hardware.max_num_seqs=0", "hardware.max_num_seqs"),
    ("log.samples_every=0", "log.samples_every"),
]


@pytest.mark.parametrize("override,key", BAD, ids=[o for o, _ in BAD])
def test_out_of_range_option_fails_before_vllm_starts_naming_the_key(tmp_path, override, key):
    value = override.split("=", 1)[1]
    message = fails_at_start(tmp_path, override)
    assert key in message and value in message, message


def test_lora_rank_below_one_is_named(tmp_path):
    assert "finetune.lora.r" in fails_at_start(tmp_path, "mode=lora", "finetune.lora.r=0")


@pytest.mark.parametrize("override", ["train.group_size=2", "rollout.top_p=1", "rollout.temperature=0.7",
                                      "loss.beta=0", "loss.is_cap=1", "scheduler.decay=cosine"])
def test_boundary_values_are_accepted(override):
    validate(make_cfg(override))


@pytest.mark.parametrize("group", ["loss", "advantage"])
def test_every_loss_and_advantage_preset_builds(group):
    """`python train.py -m loss=grpo,cispo,...`: each preset composes and its options pass the checks."""
    from grpo.advantages import check_estimator
    from grpo.loss import GRPOLoss
    from hydra.utils import instantiate

    presets = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
    assert len(presets) >= 3
    for preset in presets:
        cfg = make_cfg(f"{group}={preset}")
        validate(cfg)
        check_estimator(cfg.advantage.estimator, cfg.advantage.scale_rewards)
        assert isinstance(instantiate(cfg.loss), GRPOLoss)


def test_missing_data_file_fails_before_server_start(tmp_path):
    cfg = make_cfg("env=gsm8k", "env.source=../shared/data/no_such_dir")
    with pytest.raises(Exception) as err:
        with open_run(cfg, tmp_path):
            pass
    assert "no_such_dir" in str(err.value)
    assert not (tmp_path / "vllm.log").exists()  # failed before vLLM was started


def test_resume_path_naming_nothing_fails_before_server_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the user typed it: resume=no_such_run is tmp_path/no_such_run
    with pytest.raises(FileNotFoundError, match=f"resume=no_such_run: no such file or directory \\({tmp_path}/no_such_run\\)"):
        with open_run(make_cfg("resume=no_such_run"), tmp_path / "run"):
            pass
    assert not (tmp_path / "run" / "vllm.log").exists()


def test_unknown_env_kwarg_is_named(tmp_path):
    cfg = make_cfg("+env.shuffle_typo=1")
    with pytest.raises(Exception) as err:
        with open_run(cfg, tmp_path):
            pass
    assert "shuffle_typo" in str(err.value)
