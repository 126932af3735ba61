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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from bridges.base import Bridge
from envs.base import Env
from envs.overlong import OverlongPenalty
from grpo import checkpoint, distributed, dynamic_sampling, final
from grpo.cores import pinned_trainer
from grpo.async_rollout import InlineRollouts, RolloutPipeline, Rollouts, Schedule, check_mode
from grpo.advantages import check_estimator, estimate_advantages
from grpo.batch import Batch, Rollout, build_batch
from grpo.config import register_configs, validate
from grpo.evaluate import Evaluator
from grpo.logger import PhaseTimer, RunLogger, SilentLogger
from grpo.loss import GRPOLoss
from grpo.policy import Policy
from grpo.precision import Precision, dtype_name, warn_if_update_rounds_away
from serving.client import VLLMClient
from serving.guard import RestartGuard, Unguarded
from serving.lifeline import exit_on_sigterm
from serving.server import VLLMServer, model_path, served_dtype_name, server_from_config

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
        if self.rollouts is None:  # k = 0: each step's rollout is generated when train_step asks
            self.rollouts = InlineRollouts(lambda step: produce(self, step))


def build(cfg: DictConfig, run_dir: Path, cleanup: ExitStack) -> Run:
    """Build every part; each one that holds a resource (vLLM, worker pools, files) is registered
    with `cleanup` as soon as it exists, so a failure half-way through leaves nothing running."""
    validate(cfg)  # every range and choice, by its key, before anything starts
    check_estimator(cfg.advantage.estimator, cfg.advantage.scale_rewards)  # e.g. reinforce_pp has no group std
    dynamic_sampling.check(cfg.train)  # every sampling round's seeds fit in its step's
    check_mode(cfg.mode.name, cfg.train.max_staleness)  # shared/legacy cannot keep weights fixed during a request
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
    procs = distributed.world_size()  # torchrun's trainer processes (grpo/distributed.py)
    distributed.check_rows(cfg.train.prompts_per_step * cfg.train.group_size)
    distributed.check_devices(cfg.hardware, torch.cuda.device_count())
    device = distributed.device(cfg.hardware.device)
    path = distributed.broadcast_object(model_path(cfg) if distributed.is_main() else None)  # rank 0 builds it
    bridge: Bridge = instantiate(cfg.mode.bridge)  # a setup the bridge cannot serve fails before vLLM starts
    bridge.check_trainer_procs(procs)
    server = server_from_config(cfg, path, run_dir, extra_args=bridge.server_args(), extra_env=bridge.server_env())
    cleanup.callback(server.stop)
    cleanup.callback(bridge.close)
    served = distributed.broadcast_object(served_dtype_name(cfg, server) if distributed.is_main() else None)
    precision = Precision.resolve(served, cfg.model.master_dtype, cfg.hardware.autocast, device,
                                  shared_by=cfg.mode.name if bridge.shares_weights else None)
    policy = Policy(path, precision, device, cfg.model.gradient_checkpointing,
                    temperature=cfg.rollout.temperature, lora=cfg.mode.lora, compile=cfg.hardware.compile,
                    model=bridge.build_model(path, dtype_name(precision.served), device, server))
    warn_if_update_rounds_away(policy.model, cfg.optimizer.lr, precision.master)
    if loss.needs_reference:
        policy.load_reference()
    if procs > 1 and policy.lora is None:
        distributed.shard_model(policy.model)  # FSDP2; LoRA's adapters stay replicated
    if ckpt:
        checkpoint.load_policy_weights(policy, ckpt)
    if distributed.is_main():  # rank 0 alone talks to vLLM; the other ranks' server is never started
        server.start()  # a no-op if the bridge started it to build the model on vLLM's weights
    client = instantiate(cfg.rollout, server=server, model=cfg.model.served_name)
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
        run.rollouts = RolloutPipeline(lambda step: produce(run, step),
                                       Schedule(cfg.train.max_staleness, cfg.mode.sync_every, run.start_step),
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


def rollout_seed(cfg: DictConfig, step: int) -> int:
    """Base sampling seed of a step (its samples get base + 0..P*n-1, P*n < 2**20): rollouts
    depend on (seed, step) only, so a resumed run draws exactly what the uninterrupted one did."""
    return (cfg.train.seed << 40) + (step << 20)


def optimize(run: Run, batch: Batch, step: int) -> dict:
    """GRPO update on one batch of rollouts: `train.num_iterations` passes of micro-batched
    gradient accumulation, one optimizer step each, then one scheduler step. Returns averaged
    loss metrics, the policy's mean entropy on the sampled tokens and the lr the step used."""
    policy, loss, size, passes = run.policy, run.loss, run.cfg.train.micro_batch_size, run.cfg.train.num_iterations
    # Normalisers are the whole step's; each trainer process then trains its share of the rows,
    # and the summed gradients are the one-process gradient (grpo/distributed.py).
    num_items, rows = batch.completion_mask.sum(), batch.size
    batch = batch.rows(distributed.shard_rows(rows))
    lr = run.optimizer.param_groups[0]["lr"]
    with torch.no_grad():
        batch.ref_logp = torch.cat([policy.reference_logprobs(m) for m in batch.micro_batches(size)]) \
            if loss.needs_reference else None
        # With several passes, the ratio must be taken against the rollout-time policy.
        batch.old_logp = torch.cat([policy.logprobs(m) for m in batch.micro_batches(size)]) if passes > 1 else None
    distributed.reshard(policy.model)  # after no-grad forwards of a sharded model (grpo/distributed.py)
    totals: dict[str, float] = {"entropy": 0.0}
    skipped = 0
    for _ in range(passes):
        run.optimizer.zero_grad(set_to_none=True)
        for micro in batch.micro_batches(size):
            # entropy [b, C] from the same logits; with a gradient only if the loss trains on it
            logp, entropy = policy.logprobs_and_entropy(micro, grad=loss.needs_entropy_grad)
            # Mean policy entropy over the sampled tokens: a collapsing policy shows here first.
            mask = micro.completion_mask.to(logp.device)
            totals["entropy"] += (entropy.detach() * mask).sum().item() / max(num_items.item(), 1.0) / passes
            old_logp = micro.old_logp if micro.old_logp is not None else logp.detach()
            out = loss(logp, old_logp, micro.sampling_logp.to(logp.device), micro.ref_logp,
                       micro.advantages.to(logp.device), mask, num_items_in_batch=num_items, entropy=entropy,
                       batch_rows=rows)
            (out.loss * loss.micro_weight(micro.size, rows)).backward()
            for k, v in {"loss": out.loss.item(), **out.metrics}.items():
                totals[k] = totals.get(k, 0.0) + v * micro.size / rows / passes
        distributed.sum_replicated_grads(policy.trainable_parameters())  # LoRA's; FSDP sums its own
        grad_norm = distributed.clip_grad_norm(policy.trainable_parameters(), run.cfg.train.max_grad_norm)
        loss.after_update(distributed.sum_over_ranks)  # e.g. the adaptive entropy coefficient moves
        if not torch.isfinite(grad_norm):
            # A NaN/inf gradient would poison the weights for good: drop this update, keep the run.
            skipped += 1
            run.optimizer.zero_grad(set_to_none=True)
            continue
        with run.bridge.step_context():
            run.optimizer.step()
    run.scheduler.step()
    totals = distributed.sum_over_ranks(totals)
    if skipped:
        run.logger.event(step, "skipped_update", reason="non-finite gradient norm", loss=totals.get("loss"),
                         updates=skipped)
    return {**totals, "grad_norm": float(grad_norm), "skipped_updates": skipped, "lr": lr}


def generate(run: Run, step: int, round_: int = 0) -> Rollout:
    """The step's prompts and vLLM's `group_size` completions of each (seeded by the step, and
    the sampling round: dynamic sampling draws more than one)."""
    cfg = run.cfg
    prompts = run.env.sample(cfg.train.prompts_per_step)
    prompt_ids = [run.policy.encode_chat(p.messages) for p in prompts]
    seed = rollout_seed(cfg, step) + round_ * cfg.train.prompts_per_step * cfg.train.group_size
    groups = run.guard.call(step, lambda: run.client.generate(prompt_ids, n=cfg.train.group_size, seed=seed))
    return Rollout(prompts, prompt_ids, groups)


def sync_weights(run: Run, step: int) -> dict:
    """Every `mode.sync_every` steps and at the last: push the weights into vLLM, verified."""
    if step % run.cfg.mode.sync_every and step != run.cfg.train.steps:
        return {}
    run.rollouts.before_sync(step)  # never during a request: wait for those due on older weights
    stats = run.guard.call(step, lambda: run.bridge.sync(step))
    run.logger.sync(stats.to_dict())
    return {"sync_ms": stats.ms, "sync_bytes": stats.bytes, "probe_max_diff": stats.probe_max_diff}


def score(run: Run, rollout: Rollout) -> None:
    """The env's reward components and their weighted sum, each [P, G]; one it could not give is NaN, never 0."""
    scores = run.overlong.add(run.env.score(rollout.prompts, rollout.texts), rollout.groups)
    rollout.set_scores(scores, run.overlong.weights(run.env.reward_weights))


def produce(run: Run, step: int) -> tuple[Rollout, dict]:
    """Steps 1-2 of a step (rank 0): its rollout, generated and scored, and the phases' seconds."""
    timer = PhaseTimer()

    def draw(round_: int) -> Rollout:
        with timer("time_generate"):  # 1. vLLM samples group_size completions per prompt
            rollout = generate(run, step, round_)
        with timer("time_score"):  # 2. rewards [P, G]; one the env could not give is NaN, never 0
            score(run, rollout)
        return rollout

    # One round, or with train.dynamic_sampling as many as it takes to fill the step with untied groups
    rollout = dynamic_sampling.sample_groups(draw, run.cfg.train, distributed.world_size())
    return rollout, timer.seconds


def learn(run: Run, rollout: Rollout, step: int) -> tuple[Batch, dict]:
    """Advantages from the scored rollout, then the GRPO update: the step's train phase."""
    advantages = estimate_advantages(rollout.rewards, run.cfg.advantage.estimator,
                                     run.cfg.advantage.scale_rewards)  # [P, G]
    batch = build_batch(rollout, advantages, run.policy.pad_id)
    return batch, optimize(run, batch, step)


def train_step(run: Run, step: int) -> dict:
    """One GRPO step: sample -> score -> advantages -> loss + optimizer step -> sync; its metrics."""
    cfg, timer, main = run.cfg, PhaseTimer(), distributed.is_main()
    began = time.perf_counter()
    if main:  # 1-2. generated and scored now, or taken from the producer thread that ran ahead
        rollout, timer.seconds = run.rollouts.take(step)
    else:
        rollout, timer.seconds = None, {"time_generate": 0.0, "time_score": 0.0, "time_wait_rollout": 0.0}
    rollout = distributed.broadcast_object(rollout)  # every trainer process gets the whole step
    trained = time.perf_counter()
    with timer("time_train"), run.rollouts.update(step):
        batch, loss_metrics = learn(run, rollout, step)  # 3. advantages [P, G], 4. loss + optimizer step
    overlap = run.rollouts.busy(trained, time.perf_counter())  # the producer generating beside training
    with timer("time_sync"):  # 5. new weights -> vLLM
        sync = sync_weights(run, step)
    if step % cfg.log.samples_every == 0 or step == 1:
        run.logger.samples(step, rollout, batch.advantages)
    generated = int(batch.completion_mask.sum())
    step_s = time.perf_counter() - began
    return {
        **rollout.reward_metrics(),
        **rollout.completion_metrics(),
        **rollout.sampling,
        "tokens_per_s": generated / max(timer.seconds["time_generate"], 1e-9),
        **loss_metrics,
        **sync,
        "vllm_restarts": run.guard.restarts,
        **timer.seconds,
        "time_step": step_s,
        "overlap_frac": overlap / step_s,  # time generation and training both ran / step time
    }


def evaluate(run: Run, step: int) -> None:
    """Held-out eval of the weights vLLM serves after `step` (0: before training), when due:
    eval.jsonl, eval_samples.jsonl, wandb `eval/...` and a console line."""
    if run.evaluator is None or not run.evaluator.due(step, run.cfg.train.steps):
        return
    metrics, rows = run.guard.call(step, lambda: run.evaluator(run.client, run.policy.encode_chat))
    run.logger.eval(step, metrics, rows)


def train(cfg: DictConfig, run_dir: Path | None = None) -> list[dict]:
    """Run GRPO as configured; returns the per-step metrics (also in metrics.jsonl)."""
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    history = []
    with open_run(cfg, run_dir) as run:
        if run.start_step == 0:
            evaluate(run, 0)
        for step in range(run.start_step + 1, cfg.train.steps + 1):
            metrics = train_step(run, step)
            run.logger.step(step, metrics)
            history.append(metrics)
            evaluate(run, step)
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                checkpoint.save(run, step)
        # Inside the run: in mode=shared the weights are vLLM's memory, gone once it stops.
        out = final.save(run.policy, run.run_dir, merge_lora=bool(cfg.mode.lora and cfg.mode.lora.merge_on_save))
        run.logger.event(cfg.train.steps, "final_model", path=str(out))
    return history


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    history = train(cfg)
    last = history[-min(5, len(history)):]
    return sum(m["reward_mean"] for m in last) / max(len(last), 1) if history else math.nan


if __name__ == "__main__":
    main()
