"""Structured configs: every YAML in conf/ merges into these dataclasses, so a wrong key or type
fails at start with its full name (e.g. `Key 'lr_typo' not in 'TrainConfig'`).

`env`, `mode.bridge` and `rollout` carry a `_target_` and are built by `hydra.utils.instantiate`;
their extra keys are the constructor's arguments and fail there, also at start, by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from grpo.tiny_model import TinySpec


@dataclass
class ModelConfig:
    path: Optional[str] = None  # hub id or local directory; unused when `tiny` is set
    tiny: Optional[TinySpec] = None  # build this tiny model locally instead
    dtype: str = "float32"
    max_model_len: int = 1024
    served_name: str = "policy"
    gradient_checkpointing: bool = False


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    max_lora_rank: int = 64  # the server's --max-lora-rank; r above it fails at start


@dataclass
class ModeConfig:
    name: str = MISSING
    bridge: Any = MISSING  # {_target_: bridges.<mode>.<Bridge>, ...}
    sync_every: int = 1  # steps between weight syncs
    lora: Optional[LoraConfig] = None  # set: train adapters only
    server_args: list[str] = field(default_factory=list)  # vLLM flags this mode needs
    server_env: dict[str, str] = field(default_factory=dict)


@dataclass
class HardwareConfig:
    device: str = "cpu"  # trainer device
    torch_threads: Optional[int] = None  # trainer intra-op threads (None: torch's default)
    vllm_tp: int = 1
    vllm_dp: int = 1
    vllm_devices: Optional[str] = None  # CUDA_VISIBLE_DEVICES of the server
    gpu_memory_utilization: float = 0.1  # on CPU vLLM sizes its KV cache from RAM with this
    max_num_seqs: int = 256
    server_args: list[str] = field(default_factory=list)  # vLLM flags this hardware needs
    server_env: dict[str, str] = field(default_factory=dict)


@dataclass
class ServerConfig:
    base_url: Optional[str] = None  # attach to a running server instead of starting one
    host: str = "127.0.0.1"  # dev endpoints (reload, collective_rpc, LoRA) listen here only
    port: Optional[int] = None  # None: pick a free port
    api_key: Optional[str] = None
    startup_timeout_s: float = 600.0
    extra_args: list[str] = field(default_factory=list)


@dataclass
class RolloutConfig:
    _target_: str = "serving.client.VLLMClient"
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    timeout_s: float = 600.0
    ignore_eos: bool = False  # sample on past EOS to max_tokens (benchmarks compare equal token counts)


@dataclass
class LossConfig:
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0  # k3 KL weight; 0 loads no reference model
    scale_rewards: str = "group"  # group | batch | none
    num_iterations: int = 1  # optimizer passes over each batch of rollouts
    is_level: str = "token"  # token | sequence | none: vLLM/trainer mismatch correction
    is_mode: str = "truncate"  # truncate | mask
    is_cap: float = 2.0


@dataclass
class TrainConfig:
    steps: int = 40
    prompts_per_step: int = 8
    group_size: int = 8
    micro_batch_size: int = 64  # sequences per forward/backward
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0  # also seeds each step's rollouts, so a resumed run samples what the straight one did
    checkpoint_every: int = 0  # steps between checkpoints in <run_dir>/checkpoints (0: none)


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline | disabled
    project: str = "grpo-lab"
    entity: Optional[str] = None


@dataclass
class LogConfig:
    samples_every: int = 5  # steps between samples.jsonl dumps
    progress: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    model: ModelConfig = MISSING
    mode: ModeConfig = MISSING
    env: Any = MISSING
    hardware: HardwareConfig = MISSING
    server: ServerConfig = field(default_factory=ServerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    resume: Optional[str] = None  # a run dir (its newest complete checkpoint) or a checkpoint dir


def register_configs() -> None:
    ConfigStore.instance().store(name="config_schema", node=Config)
