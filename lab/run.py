"""The run: every part built from the config, once, before the first step."""

from __future__ import annotations

import random
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from bridges.base import Bridge
from envs.base import Env, RolloutSource, RolloutSourceEnv
from runtime import checkpoint, distributed
from runtime.cores import pinned_trainer
from runtime.async_rollout import InlineRollouts, RolloutPipeline, Rollouts, Schedule, WeightVersions
from runtime.config import max_sampled_tokens
from lab import compose
from lab.episodes import build_turns
from lab.evaluate import Evaluator
from lab.sampler import Sampler
from runtime.logger import RunLogger, SilentLogger
from grpo.loss import GRPOLoss
from grpo.policy import Policy
from grpo.precision import Precision, dtype_name, warn_if_update_rounds_away
from serving.client import VLLMClient
from serving.guard import RestartGuard, Unguarded
from serving.lifeline import exit_on_sigterm
from serving.lease import ServerLease
from serving.server import VLLMServer
from lab.server import model_path, served_dtype_name
from lab.server import build_client, build_server


@dataclass(frozen=True)
class Run:
    """Everything the loop needs, built once at start, complete (bad config fails there, before
    any step) and never reassigned."""

    cfg: DictConfig
    run_dir: Path
    precision: Precision
    env: Env
    policy: Policy
    server: VLLMServer
    client: VLLMClient
    bridge: Bridge
    loss: GRPOLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    logger: RunLogger | SilentLogger
    guard: RestartGuard | Unguarded  # restarts our vLLM if it dies or hangs (one trainer process)
    sampler: Sampler | RolloutSource  # a step's rollout, generated and scored (rank 0)
    rollouts: Rollouts  # inline (k = 0) or the producer thread (train.max_staleness > 0, rank 0)
    evaluator: Optional[Evaluator]  # held-out eval (eval.enabled, rank 0)
    start_step: int = 0  # the step a resumed run's checkpoint ended with

    def stateful(self) -> dict[str, checkpoint.Stateful]:
        """The parts a checkpoint saves and restores, beside the policy and the optimizer; the
        RNGs last, so a resumed run draws what the saved one would have drawn."""
        return {"scheduler": self.scheduler, "env": self.env, "loss": self.loss, "guard": self.guard,
                "rollouts": self.rollouts, "rng": checkpoint.RandomState()}


def build(cfg: DictConfig, run_dir: Path, cleanup: ExitStack) -> Run:
    """Build every part; each one that holds a resource (vLLM, worker pools, files) is registered
    with `cleanup` as soon as it exists, so a failure half-way through leaves nothing running."""
    bridge = compose.check(cfg)  # every range and choice by its key; what the sync cannot serve, refused
    loss = instantiate(cfg.loss, max_completion_length=max_sampled_tokens(cfg.rollout))  # checks its options
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    # Before any compute starts threads; given back at the end (a multirun's next job starts unpinned).
    cleanup.enter_context(pinned_trainer(cfg.hardware.trainer_cpus, cfg.hardware.torch_threads))
    # Read once; a bad path fails before vLLM starts.
    saved = checkpoint.read(checkpoint.newest_complete(cfg.resume)) if cfg.resume else None
    start_step = saved.step if saved else 0
    env = instantiate(cfg.env)  # a missing data file fails here, before vLLM starts
    cleanup.callback(env.close)
    overlong = instantiate(cfg.overlong, default_length=cfg.rollout.max_tokens)  # checks its keys
    overlong.weights(env.reward_weights)  # a clash with the env's component names fails now
    main = distributed.is_main()  # rank 0 alone talks to vLLM and writes the run's records
    # Its held-out prompts are read now: a missing split or eval.n < eval.k fails before vLLM starts.
    evaluator = Evaluator.from_config(cfg, env) if cfg.eval.enabled and main else None
    procs = distributed.world_size()  # torchrun's trainer processes (runtime/distributed.py)
    distributed.check_rows(cfg.train.prompts_per_step * cfg.train.group_size)
    distributed.check_devices(cfg.hardware, torch.cuda.device_count())
    device = distributed.device(cfg.hardware.device)
    path = distributed.broadcast_object(model_path(cfg) if main else None)  # rank 0 builds it
    server = build_server(cfg, run_dir, bridge=bridge, model=path)
    cleanup.callback(server.stop)
    if main and server.external:  # another run's weights pushed into it would fail our syncs' probes
        cleanup.enter_context(ServerLease(server.base_url, run_dir, cfg.server.lease_wait_s))
    cleanup.callback(bridge.close)
    served = distributed.broadcast_object(served_dtype_name(cfg, server) if main else None)
    precision = Precision.resolve(served, cfg.model.master_dtype, cfg.hardware.autocast, device,
                                  shared_by=cfg.sync.name if bridge.capabilities.model_from_server else None)
    if bridge.capabilities.model_from_server:
        server.start()  # the trainer's model is built on vLLM's weights
    policy = Policy(path, precision, device, cfg.model.gradient_checkpointing,
                    temperature=cfg.rollout.temperature, lora=cfg.finetune.lora, compile=cfg.hardware.compile is True,
                    logprob_chunk_tokens=cfg.train.logprob_chunk_tokens,
                    model=bridge.build_model(path, dtype_name(precision.served), device, server))
    warn_if_update_rounds_away(policy.model, cfg.optimizer.lr, precision.master)
    if loss.needs_reference:
        policy.load_reference()
    if procs > 1 and policy.lora is None:
        distributed.shard_model(policy.model)  # FSDP2; LoRA's adapters stay replicated
    if saved:
        checkpoint.load_policy_weights(policy, saved.path)
    if main:  # the other ranks' server is never started
        server.start()  # a no-op if started to build the model on vLLM's weights
    client = build_client(cfg, server, bridge.served_model)  # LoRA adapter hot-swap: rollouts name the adapter
    bridge.setup(policy, server, client, run_dir)
    bridge.initial_sync(start_step if saved else None)
    optimizer = instantiate(cfg.optimizer, policy.trainable_parameters())
    scheduler = instantiate(cfg.scheduler, optimizer, total_steps=cfg.train.steps)
    logger = RunLogger(run_dir, cfg, total_steps=cfg.train.steps, start_step=start_step) if main else SilentLogger()
    cleanup.callback(logger.close)
    # A vLLM restart re-pushes the trainer's weights between optimizer steps, never during one.
    versions = WeightVersions(start_step)
    guard = Unguarded() if procs > 1 else \
        RestartGuard(server, path, resync=versions.resync(bridge.sync),
                     on_restart=lambda step, **info: logger.event(step, "vllm_restart", **info))
    # An env that brings its rollouts generated and scored (env=atropos) is the rollout source itself.
    if isinstance(env, RolloutSourceEnv):
        sample = env.rollouts(policy, client)
    else:
        turns = build_turns(env, policy.tokenizer, policy.encode_chat, path, cfg.rollout)  # checks a multi-turn template
        sample = Sampler(env, turns, client, guard, overlong, cfg.train, procs)
    if cfg.train.max_staleness and main:
        rollouts = RolloutPipeline(sample, Schedule(cfg.train.max_staleness, cfg.sync.sync_every, start_step),
                                   cfg.train.steps, versions)
        cleanup.callback(rollouts.stop)
    else:  # k = 0: each step's rollout is generated when train_step asks
        rollouts = InlineRollouts(sample)
    run = Run(cfg, run_dir, precision, env, policy, server, client, bridge, loss, optimizer, scheduler, logger, guard,
              sample, rollouts, evaluator, start_step)
    logger.event(start_step, "precision", **precision.to_dict())
    if saved:  # last: the RNG states must be the saved ones, whatever building drew from them
        checkpoint.restore(saved, policy, optimizer, run.stateful())
        logger.event(start_step, "resumed", checkpoint=str(saved.path))
    rollouts.start()  # last: it samples the env and talks to vLLM
    return run


@contextmanager
def open_run(cfg: DictConfig, run_dir: Path) -> Iterator[Run]:
    """The built run; on leaving, everything it started is stopped (vLLM, pools, files), on
    SIGTERM too (it exits like Ctrl-C; a vLLM we started dies with us even on SIGKILL)."""
    with exit_on_sigterm(), ExitStack() as cleanup:
        distributed.init(cfg.hardware.device)  # several trainer processes: join their group
        cleanup.callback(distributed.close)
        yield build(cfg, distributed.agree_run_dir(run_dir), cleanup)
