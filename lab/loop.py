"""The GRPO loop: sample -> score -> advantages -> loss -> step -> sync -> log.

`train(cfg)` is what `python train.py` runs: it opens the run (lab/run.py builds every part once),
then each step takes its scored rollout (lab/sampler.py, inline or from the async producer),
computes advantages, trains, syncs the weights into vLLM, logs, evaluates and checkpoints.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from grpo.advantages import estimate_advantages
from grpo.batch import Batch, Rollout, build_batch
from grpo.packing import micro_batches
from lab import autocompile, final
from lab.run import Run, open_run
from runtime import checkpoint, distributed
from runtime.logger import PhaseTimer


def optimize(run: Run, batch: Batch, step: int) -> dict:
    """GRPO update on one batch of rollouts: `train.num_iterations` passes of micro-batched
    gradient accumulation, one optimizer step each, then one scheduler step. Returns averaged
    loss metrics, the policy's mean entropy on the sampled tokens and the lr the step used."""
    policy, loss, passes = run.policy, run.loss, run.cfg.train.num_iterations
    # Row-count micro-batches, or packed ones within a token budget (grpo/packing.py).
    size, budget = run.cfg.train.micro_batch_size, run.cfg.train.max_tokens_per_micro_batch
    # Normalisers are the whole step's; each trainer process then trains its share of the rows,
    # and the summed gradients are the one-process gradient (runtime/distributed.py).
    num_items, rows = batch.completion_mask.sum(), batch.size
    batch = batch.rows(distributed.shard_rows(rows))
    lr = run.optimizer.param_groups[0]["lr"]
    with torch.no_grad():
        batch.ref_logp = torch.cat([policy.reference_logprobs(m) for m in micro_batches(batch, size, budget)]) \
            if loss.needs_reference else None
        # With several passes, the ratio must be taken against the rollout-time policy.
        batch.old_logp = torch.cat([policy.logprobs(m) for m in micro_batches(batch, size, budget)]) if passes > 1 else None
    distributed.reshard(policy.model)  # after no-grad forwards of a sharded model (runtime/distributed.py)
    totals: dict[str, float] = {"entropy": 0.0}
    skipped = 0
    for _ in range(passes):
        run.optimizer.zero_grad(set_to_none=True)
        for micro in micro_batches(batch, size, budget):
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


def sync_weights(run: Run, step: int) -> dict:
    """Every `sync.sync_every` steps and at the last: push the weights into vLLM, verified."""
    if step % run.cfg.sync.sync_every and step != run.cfg.train.steps:
        return {}
    run.rollouts.before_sync(step)  # never during a request: wait for those due on older weights
    stats = run.guard.call(step, lambda: run.bridge.sync(step))
    run.logger.sync(stats.to_dict())
    # What the sync cost the run: its push, plus generation paused for it (sync=shared).
    return {"sync_ms": stats.ms + stats.pause_ms, "sync_bytes": stats.bytes, "probe_max_diff": stats.probe_max_diff}


def learn(run: Run, rollout: Rollout, step: int) -> tuple[Batch, dict]:
    """Advantages from the scored rollout, then the GRPO update: the step's train phase."""
    advantages = estimate_advantages(rollout.rewards, run.cfg.advantage.estimator,
                                     run.cfg.advantage.scale_rewards)  # [P, G]
    if rollout.zero_advantage is not None:  # the env said so for these samples (envs/atropos.py)
        advantages = advantages.masked_fill(rollout.zero_advantage, 0.0)
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
    metrics, rows = run.guard.call(step, lambda: run.evaluator(run.client, run.sampler.turns))
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
            autocompile.after_step(run, step, metrics["time_train"])  # hardware.compile=auto
            run.logger.step(step, metrics)
            history.append(metrics)
            evaluate(run, step)
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                checkpoint.save(run.run_dir, step, run.policy, run.optimizer, run.stateful())
        # Inside the run: in sync=shared the weights are vLLM's memory, gone once it stops.
        lora = cfg.finetune.lora
        out = final.save(run.policy, run.run_dir, merge_lora=bool(lora and lora.merge_on_save))
        run.logger.event(cfg.train.steps, "final_model", path=str(out))
    return history
