"""The run: every part built from the config, once, before the first step."""

from __future__ import annotations

import random
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from bridges.base import Bridge
from envs.base import Env
from envs.overlong import OverlongPenalty
from runtime import checkpoint, distributed
from runtime.cores import pinned_trainer
from runtime.async_rollout import InlineRollouts, RolloutPipeline, Rollouts, Schedule
from lab import compose
from lab.evaluate import Evaluator
from runtime.logger import RunLogger, SilentLogger
from grpo.loss import GRPOLoss
from grpo.policy import Policy
from grpo.precision import Precision, dtype_name, warn_if_update_rounds_away
from serving.client import VLLMClient
from serving.guard import RestartGuard, Unguarded
from serving.lifeline import exit_on_sigterm
from serving.server import VLLMServer, model_path, served_dtype_name, server_from_config


@dataclass
class Run:
    """Everything the loop needs, built once at start (bad config fails here, before any step)."""

    cfg: DictConfig
    run_dir: Path
    env: Env
    policy: Policy
    server: VLLMServer
    client: VLLMClient
    bridge: Bridge
    loss: GRPOLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    logger: RunLogger
    start_step: int = 0  # the step a resumed run's checkpoint ended with
    guard: Optional[RestartGuard] = None  # restarts our vLLM if it dies; set by build()
    evaluator: Optional[Evaluator] = None  # held-out eval (eval.enabled); set by build()
    rollouts: Optional[Rollouts] = None  # the producer thread (train.max_staleness > 0, rank 0); else inline
    overlong: OverlongPenalty = field(default_factory=OverlongPenalty)  # `overlong:` shaping (weight 0: none)

    def __post_init__(self):
        from lab.loop import produce

        if self.rollouts is None:  # k = 0: each step's rollout is generated when train_step asks
            self.rollouts = InlineRollouts(lambda step: produce(self, step))


def build(cfg: DictConfig, run_dir: Path, cleanup: ExitStack) -> Run:
    """Build every part; each one that holds a resource (vLLM, worker pools, files) is registered
    with `cleanup` as soon as it exists, so a failure half-way through leaves nothing running."""
    bridge = compose.check(cfg)  # every range and choice by its key; what the sync cannot serve, refused
    loss = instantiate(cfg.loss, max_completion_length=cfg.rollout.max_tokens)  # checks its options
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    # Before any compute starts threads; given back at the end (a multirun's next job starts unpinned).
    cleanup.enter_context(pinned_trainer(cfg.hardware.trainer_cpus, cfg.hardware.torch_threads))
    ckpt = checkpoint.newest_complete(cfg.resume) if cfg.resume else None  # a bad path fails before vLLM starts
    env = instantiate(cfg.env)  # a missing data file fails here, before vLLM starts
    cleanup.callback(env.close)
    overlong = instantiate(cfg.overlong, default_length=cfg.rollout.max_tokens)  # checks its keys
    overlong.weights(env.reward_weights)  # a clash with the env's component names fails now
    # Its held-out prompts are read now: a missing split or eval.n < eval.k fails before vLLM starts.
    evaluator = Evaluator.from_config(cfg, env) if cfg.eval.enabled and distributed.is_main() else None  # rank 0 asks vLLM
    procs = distributed.world_size()  # torchrun's trainer processes (runtime/distributed.py)
    distributed.check_rows(cfg.train.prompts_per_step * cfg.train.group_size)
    distributed.check_devices(cfg.hardware, torch.cuda.device_count())
    device = distributed.device(cfg.hardware.device)
    path = distributed.broadcast_object(model_path(cfg) if distributed.is_main() else None)  # rank 0 builds it
    server = server_from_config(cfg, path, run_dir, extra_args=bridge.server_args(), extra_env=bridge.server_env())
    cleanup.callback(server.stop)
    cleanup.callback(bridge.close)
    served = distributed.broadcast_object(served_dtype_name(cfg, server) if distributed.is_main() else None)
    precision = Precision.resolve(served, cfg.model.master_dtype, cfg.hardware.autocast, device,
                                  shared_by=cfg.sync.name if bridge.capabilities.model_from_server else None)
    if bridge.capabilities.model_from_server:
        server.start()  # the trainer's model is built on vLLM's weights
    policy = Policy(path, precision, device, cfg.model.gradient_checkpointing,
                    temperature=cfg.rollout.temperature, lora=cfg.finetune.lora, compile=cfg.hardware.compile,
                    model=bridge.build_model(path, dtype_name(precision.served), device, server))
    warn_if_update_rounds_away(policy.model, cfg.optimizer.lr, precision.master)
    if loss.needs_reference:
        policy.load_reference()
    if procs > 1 and policy.lora is None:
        distributed.shard_model(policy.model)  # FSDP2; LoRA's adapters stay replicated
    if ckpt:
        checkpoint.load_policy_weights(policy, ckpt)
    if distributed.is_main():  # rank 0 alone talks to vLLM; the other ranks' server is never started
        server.start()  # a no-op if started to build the model on vLLM's weights
    client = instantiate(cfg.rollout, server=server, model=bridge.served_model or cfg.model.served_name)
    bridge.setup(policy, server, client, run_dir)
    bridge.initial_sync(checkpoint.saved_step(ckpt) if ckpt else None)
    optimizer = instantiate(cfg.optimizer, policy.trainable_parameters())
    scheduler = instantiate(cfg.scheduler, optimizer, total_steps=cfg.train.steps)
    run = Run(cfg, run_dir, env, policy, server, client, bridge, loss, optimizer, scheduler, None, evaluator=evaluator,
              overlong=overlong)
    run.guard = Unguarded() if procs > 1 else \
        RestartGuard(server, path, resync=bridge.sync,
                     on_restart=lambda step, **info: run.logger.event(step, "vllm_restart", **info))
    if ckpt:  # last: the RNG states must be the saved ones, whatever building drew from them
        run.start_step = checkpoint.load_trainer_state(run, ckpt)
    run.logger = RunLogger(run_dir, cfg, total_steps=cfg.train.steps, start_step=run.start_step) \
        if distributed.is_main() else SilentLogger()
    cleanup.callback(run.logger.close)
    run.logger.event(run.start_step, "precision", **precision.to_dict())
    if ckpt:
        run.logger.event(run.start_step, "resumed", checkpoint=str(ckpt))
    if cfg.train.max_staleness and distributed.is_main():  # last: it samples the env and talks to vLLM
        from lab.loop import produce

        run.rollouts = RolloutPipeline(lambda step: produce(run, step),
                                       Schedule(cfg.train.max_staleness, cfg.sync.sync_every, run.start_step),
                                       cfg.train.steps, ready=checkpoint.saved_rollouts(ckpt) if ckpt else None)
        if isinstance(run.guard, RestartGuard):
            run.guard.resync = run.rollouts.resync(run.guard.resync)
        cleanup.callback(run.rollouts.stop)
        run.rollouts.start()
    return run


@contextmanager
def open_run(cfg: DictConfig, run_dir: Path) -> Iterator[Run]:
    """The built run; on leaving, everything it started is stopped (vLLM, pools, files), on
    SIGTERM too (it exits like Ctrl-C; a vLLM we started dies with us even on SIGKILL)."""
    with exit_on_sigterm(), ExitStack() as cleanup:
        distributed.init(cfg.hardware.device)  # several trainer processes: join their group
        cleanup.callback(distributed.close)
        yield build(cfg, distributed.agree_run_dir(run_dir), cleanup)
