"""Weight-sync latency of one bridge (`mode=` preset or `finetune=` + `sync=`) on one model: one CSV row per Hydra job.

    python -m experiments.sync_latency -m bench=sync_latency                   # every mode x width
    python -m experiments.sync_latency mode=legacy model.tiny.hidden_size=512  # one point

The run is built exactly as `train.py` builds it (server, policy, bridge), then the weights are
moved `bench.repeats` times by noise of size `bench.noise` (what an optimizer step does to them)
and synced; every sync is verified by the bridge, and its stats also land in `sync.jsonl`.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.errors import record_point
from experiments.noise import perturb
from experiments.schema import SyncBench, use_schema
from experiments.sizes import config_columns, weight_columns
from lab.run import open_run

BENCH = SyncBench
use_schema(BENCH)


def measure(cfg: DictConfig, run_dir: Path) -> dict:
    with open_run(cfg, run_dir) as run:
        stats = []
        for step in range(1, cfg.bench.repeats + 1):
            perturb(run, cfg.bench.noise)
            stats.append(run.bridge.sync(step))
            run.logger.sync(stats[-1].to_dict())
        ms = [s.ms + s.pause_ms for s in stats]  # sync=shared's cost is the pause around the step
        return {
            **weight_columns(run.policy.model),
            "sync_ms": statistics.median(ms),
            "sync_ms_min": min(ms),
            "sync_ms_max": max(ms),
            "verify_ms": statistics.median(s.verify_ms for s in stats),
            "bytes": statistics.median(s.bytes for s in stats),
            "probe_max_diff": max(s.probe_max_diff for s in stats),
        }


@hydra.main(config_path="../conf", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    row = {"mode": cfg.name, **config_columns(cfg), "repeats": cfg.bench.repeats, "run_dir": str(run_dir)}
    return record_point(cfg, run_dir, row, measure)


if __name__ == "__main__":
    main()
