"""GRPO against a real vLLM server: sample -> score -> advantages -> loss -> step -> sync -> log.

    python train.py                                   # tiny model, mode=reload, synthetic env, CPU
    python train.py mode=lora env=gsm8k               # another bridge, another env
    python train.py -m mode=reload,legacy train.steps=20   # a Hydra multirun sweep

Every part is chosen by config (`_target_` + `hydra.utils.instantiate`); this file only wires
them together and runs the loop. Outputs land in the Hydra run dir (see grpo/logger.py).
"""

from __future__ import annotations

import math
import random
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bridges.base import Bridge
from serving.server import VLLMRequestError, VLLMServer, server_from_config
from envs.base import Env
from grpo import checkpoint
from grpo.advantages import group_advantages
from grpo.batch import Batch, build_batch
from grpo.config import register_configs
from grpo.logger import RunLogger
from grpo.loss import get_loss, grpo_loss, importance_weights
from grpo.policy import Policy
from serving.client import VLLMClient
from grpo.tiny_model import build_tiny_model

register_configs()


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
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    logger: RunLogger
    start_step: int = 0  # the step a resumed run's checkpoint ended with
    vllm_restarts: int = 0


def model_path(cfg: DictConfig) -> str:
    if cfg.model.tiny is not None:
        return str(build_tiny_model(OmegaConf.to_object(cfg.model.tiny)))
    if not cfg.model.path:
        raise ValueError("set model.path (hub id or local dir) or model.tiny")
    return cfg.model.path


def check_loss_config(cfg: DictConfig) -> None:
    """Fail at start, naming the key, for loss options the GRPO functions would reject mid-run."""
    get_loss(cfg.loss.loss_type)
    group_advantages(torch.zeros(1, 2), cfg.loss.scale_rewards)
    importance_weights(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1),
                       cfg.loss.is_level, cfg.loss.is_mode, cfg.loss.is_cap)


def build(cfg: DictConfig, run_dir: Path, cleanup: ExitStack) -> Run:
    """Build every part; each one that holds a resource (vLLM, worker pools, files) is registered
    with `cleanup` as soon as it exists, so a failure half-way through leaves nothing running."""
    check_loss_config(cfg)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    if cfg.hardware.torch_threads:
        torch.set_num_threads(cfg.hardware.torch_threads)
    env = instantiate(cfg.env)  # a missing data file fails here, before vLLM starts
    cleanup.callback(env.close)
    path = model_path(cfg)
    bridge = instantiate(cfg.mode.bridge)  # a setup the bridge cannot serve fails before vLLM starts
    server = server_from_config(cfg, path, run_dir, extra_args=getattr(bridge, "server_args", list)())
    cleanup.callback(server.stop)
    cleanup.callback(bridge.close)
    # mode=shared: the trainer's parameters are views of vLLM's, so the bridge starts vLLM first.
    build_model = getattr(bridge, "build_model", None)
    model = build_model(path, cfg.model.dtype, cfg.hardware.device, server) if build_model else None
    policy = Policy(path, cfg.model.dtype, cfg.hardware.device, cfg.model.gradient_checkpointing,
                    temperature=cfg.rollout.temperature, lora=cfg.mode.lora, model=model)
    if cfg.loss.beta > 0:
        policy.load_reference()
    ckpt = checkpoint.newest_complete(cfg.resume) if cfg.resume else None
    if ckpt:
        checkpoint.load_policy_weights(policy, ckpt)
    if not build_model:
        server.start()
    client = instantiate(cfg.rollout, server=server, model=cfg.model.served_name)
    bridge.setup(policy, server, client, run_dir)
    # On resume always push: a LoRA adapter close to identity would pass the probe unloaded.
    if ckpt:
        bridge.sync(checkpoint.saved_step(ckpt))
    else:
        bridge.ensure_synced()
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
    warmup = max(cfg.train.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    run = Run(cfg, run_dir, env, policy, server, client, bridge, optimizer, scheduler, None)
    if ckpt:  # last: the RNG states must be the saved ones, whatever building drew from them
        run.start_step = checkpoint.load_trainer_state(run, ckpt)
    run.logger = RunLogger(run_dir, cfg, total_steps=cfg.train.steps, start_step=run.start_step)
    cleanup.callback(run.logger.close)
    if ckpt:
        run.logger.event(run.start_step, "resumed", checkpoint=str(ckpt))
    return run


@contextmanager
def open_run(cfg: DictConfig, run_dir: Path) -> Iterator[Run]:
    """The built run; on leaving, everything it started is stopped (vLLM, pools, files)."""
    with ExitStack() as cleanup:
        yield build(cfg, run_dir, cleanup)


def rollout_seed(cfg: DictConfig, step: int) -> int:
    """Base sampling seed of a step (its samples get base + 0..P*n-1, P*n < 2**20): rollouts
    depend on (seed, step) only, so a resumed run draws exactly what the uninterrupted one did."""
    return (cfg.train.seed << 40) + (step << 20)


def restart_vllm(run: Run, step: int, reason: str) -> None:
    """The owned server died: start it again on the base model, then push the current weights
    (full weights, or the LoRA adapter) through the bridge's verified sync."""
    t = time.perf_counter()
    run.server.restart(model=run.policy.path)
    run.bridge.sync(step)
    run.vllm_restarts += 1
    run.logger.event(step, "vllm_restart", reason=reason[:500], restarts=run.vllm_restarts,
                     restart_s=round(time.perf_counter() - t, 1))


def server_died(server: VLLMServer, grace_s: float = 5.0) -> bool:
    """Whether our own server is gone; a killed process can still look alive for a moment."""
    deadline = time.monotonic() + grace_s
    while not server.external and server.alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return not server.external


def vllm_call(run: Run, step: int, fn):
    """fn() talks to vLLM; if our server died before or during it, restart and call again."""
    if not run.server.external and not run.server.alive():
        restart_vllm(run, step, "server process not alive")
    try:
        return fn()
    except VLLMRequestError as exc:
        if not server_died(run.server):
            raise
        restart_vllm(run, step, str(exc))
        return fn()


def optimize(run: Run, batch: Batch) -> dict:
    """GRPO update on one batch of rollouts: `num_iterations` passes of micro-batched
    gradient accumulation, one optimizer step each. Returns averaged loss metrics."""
    cfg, policy = run.cfg, run.policy
    num_items = batch.completion_mask.sum()
    with torch.no_grad():
        batch.ref_logp = torch.cat([policy.reference_logprobs(m) for m in batch.micro_batches(cfg.train.micro_batch_size)]) \
            if cfg.loss.beta > 0 else None
        # With several passes, the ratio must be taken against the rollout-time policy.
        batch.old_logp = torch.cat([policy.logprobs(m) for m in batch.micro_batches(cfg.train.micro_batch_size)]) \
            if cfg.loss.num_iterations > 1 else None
    totals: dict[str, float] = {}
    skipped = 0
    for _ in range(cfg.loss.num_iterations):
        run.optimizer.zero_grad(set_to_none=True)
        for micro in batch.micro_batches(cfg.train.micro_batch_size):
            logp = policy.logprobs(micro)
            out = grpo_loss(
                logp,
                micro.old_logp if micro.old_logp is not None else logp.detach(),
                micro.sampling_logp.to(logp.device),
                micro.ref_logp,
                micro.advantages.to(logp.device),
                micro.completion_mask.to(logp.device),
                loss_type=cfg.loss.loss_type,
                epsilon_low=cfg.loss.epsilon_low,
                epsilon_high=cfg.loss.epsilon_high,
                beta=cfg.loss.beta,
                is_level=cfg.loss.is_level,
                is_mode=cfg.loss.is_mode,
                is_cap=cfg.loss.is_cap,
                max_completion_length=cfg.rollout.max_tokens,
                num_items_in_batch=num_items,
            )
            # dapo already divides by the whole batch's token count; the others average micro-batches.
            weight = 1.0 if cfg.loss.loss_type == "dapo" else micro.size / batch.size
            (out.loss * weight).backward()
            for k, v in {"loss": out.loss.item(), **out.metrics}.items():
                totals[k] = totals.get(k, 0.0) + v * micro.size / batch.size / cfg.loss.num_iterations
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), cfg.train.max_grad_norm)
        if not torch.isfinite(grad_norm):
            # A NaN/inf gradient would poison the weights for good: drop this update, keep the run.
            skipped += 1
            run.optimizer.zero_grad(set_to_none=True)
            continue
        with run.bridge.step_context():
            run.optimizer.step()
        run.scheduler.step()
    return {**totals, "grad_norm": float(grad_norm), "skipped_updates": skipped}


def train_step(run: Run, step: int) -> dict:
    cfg, policy = run.cfg, run.policy
    times = {}

    t = time.perf_counter()  # 1. sample: vLLM generates group_size completions per prompt
    prompts = run.env.sample(cfg.train.prompts_per_step)
    prompt_ids = [policy.encode_chat(p.messages) for p in prompts]
    groups = vllm_call(run, step, lambda: run.client.generate(prompt_ids, n=cfg.train.group_size,
                                                              seed=rollout_seed(cfg, step)))
    times["time_generate"] = time.perf_counter() - t

    t = time.perf_counter()  # 2. score
    texts = [[c.text for c in group] for group in groups]
    rewards = torch.tensor(run.env.score(prompts, texts), dtype=torch.float32)  # [P, n]
    times["time_score"] = time.perf_counter() - t

    t = time.perf_counter()  # 3. advantages, 4. loss + optimizer step
    advantages = group_advantages(rewards, cfg.loss.scale_rewards)
    batch = build_batch(prompt_ids, groups, advantages, policy.pad_id)
    loss_metrics = optimize(run, batch)
    if loss_metrics["skipped_updates"]:
        run.logger.event(step, "skipped_update", reason="non-finite gradient norm",
                         loss=loss_metrics.get("loss"), updates=loss_metrics["skipped_updates"])
    times["time_train"] = time.perf_counter() - t

    t = time.perf_counter()  # 5. sync: new weights -> vLLM, verified
    sync = {}
    if step % cfg.mode.sync_every == 0 or step == cfg.train.steps:
        stats = vllm_call(run, step, lambda: run.bridge.sync(step))
        run.logger.sync(stats.to_dict())
        sync = {"sync_ms": stats.ms, "sync_bytes": stats.bytes, "probe_max_diff": stats.probe_max_diff}
    times["time_sync"] = time.perf_counter() - t

    generated = int(batch.completion_mask.sum())
    metrics = {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item(),
        "completion_len": generated / batch.size,
        "tokens_per_s": generated / max(times["time_generate"], 1e-9),
        "lr": run.scheduler.get_last_lr()[0],
        **loss_metrics,
        **sync,
        "vllm_restarts": run.vllm_restarts,
        **times,
    }
    if step % cfg.log.samples_every == 0 or step == 1:
        run.logger.samples(step, [
            {"prompt": p.messages[-1]["content"], "answer": p.answer, "completion": c.text, "reward": r}
            for p, group, rs in zip(prompts, groups, rewards.tolist()) for c, r in zip(group, rs)
        ])
    return metrics


def train(cfg: DictConfig, run_dir: Path | None = None) -> list[dict]:
    """Run GRPO as configured; returns the per-step metrics (also in metrics.jsonl)."""
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    history = []
    with open_run(cfg, run_dir) as run:
        for step in range(run.start_step + 1, cfg.train.steps + 1):
            metrics = train_step(run, step)
            run.logger.step(step, metrics)
            history.append(metrics)
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                checkpoint.save(run, step)
    return history


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    history = train(cfg)
    last = history[-min(5, len(history)):]
    return sum(m["reward_mean"] for m in last) / max(len(last), 1) if history else math.nan


if __name__ == "__main__":
    main()
