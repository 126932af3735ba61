"""Rollout throughput of vLLM (generated tokens/s, prompts/s, latency) at one grid point, with
HF `generate` on the same model and prompts as the baseline; one CSV row per Hydra job.

    python -m experiments.rollout_throughput -m bench=rollout_throughput        # the TP x DP grid
    python -m experiments.rollout_throughput hardware.vllm_tp=2 train.group_size=16   # one point

Engines are timed alternately, `bench.repeats` times each, after `bench.warmup` untimed calls,
so machine noise hits both; the row gives medians and `speedup` = vLLM tok/s / HF tok/s.
vLLM-CPU keeps a core busy for ~1 s after each request, so every HF call first waits until the
server's processes are idle (`experiments/quiet.py`); the row records that wait and the cores the
server used while HF ran (`hf_server_busy`, ~0 when the baseline had the machine).
A grid point that cannot run (e.g. TP larger than the machine allows) becomes a row with an
`error` column, and the sweep goes on. Generation alone does not depend on the trainer's
processes; the whole step over trainer processes x TP x DP is `bench=step_scaling`
(experiments/step_time.py).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from lab.server import build_client, build_server
from experiments.errors import record_point
from experiments.hf_baseline import hf_generate
from experiments.quiet import CpuMeter, server_pids, wait_quiet
from experiments.schema import ThroughputBench, use_schema
from experiments.servers import shared_server
from experiments.sizes import config_columns, weight_columns
from grpo.policy import Policy
from grpo.precision import Precision, dtype_name, served_dtype
from lab.server import model_path

BENCH = ThroughputBench
use_schema(BENCH)


def measure(cfg: DictConfig, run_dir: Path) -> dict:
    """Time vLLM and (optionally) HF on one workload: the metric columns of a row."""
    path = model_path(cfg)
    env = instantiate(cfg.env)
    try:
        prompts = env.sample(cfg.train.prompts_per_step)
    finally:
        env.close()
    # HF's baseline generates at the served precision, as vLLM does.
    served = dtype_name(served_dtype(cfg.model.dtype, cfg.hardware.device))
    policy = Policy(path, Precision.resolve(served, master_dtype=served), cfg.hardware.device)
    policy.model.eval()
    prompt_ids = [policy.encode_chat(p.messages) for p in prompts]

    server = build_server(cfg, run_dir, model=path)
    t = time.perf_counter()
    server, reused = shared_server(server)
    row = {**weight_columns(policy.model), "server_start_s": 0.0 if reused else time.perf_counter() - t,
           "server_reused": reused}
    client = build_client(cfg, server)
    n, ro = cfg.train.group_size, cfg.rollout
    pids = server_pids(server)
    quiet: list[tuple[float, CpuMeter]] = []  # per HF call: (seconds waited for idle, CPU meter)

    def vllm() -> tuple[float, int]:
        t = time.perf_counter()
        groups = client.generate(prompt_ids, n=n)
        return time.perf_counter() - t, sum(len(c.token_ids) for g in groups for c in g)

    def hf() -> tuple[float, int]:
        waited = wait_quiet(pids, cfg.bench.quiet_threshold, timeout_s=cfg.bench.quiet_timeout_s)
        with CpuMeter(pids) as cpu:
            out = hf_generate(policy.model, prompt_ids, n, ro.max_tokens, ro.temperature, ro.top_p,
                              policy.pad_id, policy.tokenizer.eos_token_id)
        quiet.append((waited, cpu))
        return out

    engines = {"vllm": vllm, **({"hf": hf} if cfg.bench.hf_baseline else {})}
    for _ in range(cfg.bench.warmup):
        for fn in engines.values():
            fn()
    timings: dict[str, list[tuple[float, int]]] = {name: [] for name in engines}
    for _ in range(cfg.bench.repeats):
        for name, fn in engines.items():
            timings[name].append(fn())
    for name, runs in timings.items():
        row[f"{name}_tokens_per_s"] = statistics.median(tok / s for s, tok in runs)
        row[f"{name}_prompts_per_s"] = statistics.median(len(prompt_ids) / s for s, _ in runs)
        row[f"{name}_latency_ms"] = statistics.median(s * 1e3 for s, _ in runs)
        row[f"{name}_tokens"] = statistics.median(tok for _, tok in runs)
    if cfg.bench.hf_baseline:
        row["speedup"] = row["vllm_tokens_per_s"] / row["hf_tokens_per_s"]
        timed = quiet[-cfg.bench.repeats:]
        row["hf_quiet_wait_s"] = statistics.median(w for w, _ in timed)
        row["hf_server_busy"] = max(cpu.busy for _, cpu in timed)
        row["hf_others_busy"] = statistics.median(cpu.others for _, cpu in timed)
    return row


@hydra.main(config_path="../conf", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    row = {
        **config_columns(cfg),
        "tp": cfg.hardware.vllm_tp,
        "dp": cfg.hardware.vllm_dp,
        "prompts": cfg.train.prompts_per_step,
        "group_size": cfg.train.group_size,
        "max_tokens": cfg.rollout.max_tokens,
        "repeats": cfg.bench.repeats,
        "run_dir": str(run_dir),
    }
    return record_point(cfg, run_dir, row, measure)


if __name__ == "__main__":
    main()
