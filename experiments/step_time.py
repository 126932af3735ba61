"""One GRPO step, ours against TRL's `GRPOTrainer`, on the same workload: two CSV rows per Hydra job.

    python -m experiments.step_time -m bench=step_time                     # toy, ~28M, ~85M
    python -m experiments.step_time bench=step_time bench.size=28m model.dtype=bfloat16
    python -m experiments.step_time model=qwen2.5-0.5b-instruct hardware=gpu rollout.ignore_eos=true  # a real model
    python -m experiments.step_time -m bench=step_scaling                  # ours over trainer procs x vLLM TP x DP
    torchrun --nproc_per_node=2 -m experiments.step_time bench=step_time bench.trl=false   # one point, 2 procs

Ours is built and stepped exactly as train.py does (`open_run`, `train_step`); its time split is
the step's own `time_generate/score/train/sync` metrics. Then our server is stopped (or, when
attached, waited on until idle: `experiments/quiet.py`) and TRL runs the same prompts per step,
group size, completion length, dtype and thread count with our env's reward
(`experiments/trl_grpo.py`), so each side is timed while the other is quiet. Both sides run
`bench.warmup` untimed steps, then `bench.repeats` timed ones; rows give medians, generated
tokens per step, the vLLM server's CPU use while each side ran (`server_busy`, cores), the load
of everything else on the machine (`others_busy`), and `ratio` = TRL step / our step (> 1: ours
is faster). Every row names the machine (`cpu`: model name and its native-bf16 extensions or
widest vector ISA, runtime/cpuinfo.py; `cpu_bf16_native`) and the side's precision: `dtype`
(what generates: vLLM's served dtype, TRL's compute), `compute_dtype` (forward/backward),
`master_dtype` (weights and optimizer), as `hardware=cpu` resolves them on that CPU (mixed
precision where bf16 is native, fp32 elsewhere); ours also `compiled` (`hardware.compile`). Our row also re-times the train phase on one more rollout once vLLM is idle
(`train_alone_s`), so `train_ratio` = in-run train / alone shows what contention still costs.

Our side runs on `hardware.trainer_procs` trainer processes (runtime/distributed.py), or on as many
as torchrun started. A job started as one process that asks for N > 1 runs the point as
`torchrun --nproc_per_node=N -m experiments.step_time <its overrides>` in `<job dir>/torchrun/`
and appends the rows that rank 0 wrote there to the sweep's CSV (a torchrun that dies without
rows becomes an error row), so one Hydra sweep can vary the processes per point. Rows carry
`trainer_procs`, `tp` and `dp`; times are rank 0's, whose train phase waits for every rank.
TRL runs only beside a one-process step: its own multi-process path is accelerate, which this
benchmark does not drive, and one TRL process against N of ours compares unequal resources.
"""

from __future__ import annotations

import csv
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from runtime.csvlog import append_row, sweep_csv
from experiments.errors import describe, measure_point
from experiments.quiet import CpuMeter, server_pids, wait_quiet
from experiments.schema import StepTimeBench, use_schema
from experiments.sizes import config_columns, weight_columns
from experiments.trl_grpo import require_trl, trl_steps
from grpo import REPO_ROOT
from runtime import distributed
from grpo.precision import Precision, cpu_bf16_native, dtype_name
from serving.server import cpu_list
from lab import autocompile
from lab.loop import learn, train_step
from runtime.cpuinfo import cpu_kind
from lab.run import open_run
from lab.server import model_path

BENCH = StepTimeBench
use_schema(BENCH)

PHASES = ("generate_s", "score_s", "train_s", "sync_s")
log = logging.getLogger(__name__)


def medians(steps: list[dict], warmup: int) -> dict:
    """Per-column medians over the timed steps, plus generated tokens/s of the generate phase
    and of the whole step."""
    timed = steps[warmup:]
    row = {k: statistics.median(s[k] for s in timed) for k in ("step_s", *PHASES, "tokens")}
    row["gen_tokens_per_s"] = statistics.median(s["tokens"] / s["generate_s"] for s in timed)
    row["step_tokens_per_s"] = statistics.median(s["tokens"] / s["step_s"] for s in timed)
    return row | {"timed_steps": len(timed)}


class Ours:
    """Our side; keeps what TRL's side must match (threads) and wait for (the server's pids)."""

    def __init__(self):
        self.pids: tuple[int, ...] = ()
        self.threads = self.cpus = 0
        self.precision: Optional[Precision] = None  # what our run computed and served in (TRL computes in the same)
        self.compiled = False

    def __call__(self, cfg: DictConfig, run_dir: Path) -> dict:
        batch = cfg.train.prompts_per_step * cfg.train.group_size
        steps = []
        with open_run(cfg, run_dir) as run:
            main = distributed.is_main()  # the others train their share; rank 0 talks to vLLM and times
            self.pids, self.threads = tuple(server_pids(run.server)) if main else (), torch.get_num_threads()
            self.cpus = len(os.sched_getaffinity(0))  # the trainer's cores, if the run pins them
            self.precision = run.policy.precision  # an attached server's dtype included
            for step in range(1, cfg.train.steps + 1):
                with CpuMeter(self.pids) as cpu:
                    t = time.perf_counter()
                    metrics = train_step(run, step)
                    step_s = time.perf_counter() - t
                autocompile.after_step(run, step, metrics["time_train"])  # hardware.compile=auto, as train.py
                run.logger.step(step, metrics)
                steps.append({"step_s": step_s, "generate_s": metrics["time_generate"],
                              "score_s": metrics["time_score"], "train_s": metrics["time_train"],
                              "sync_s": metrics["time_sync"], "tokens": round(metrics["completion_len_mean"] * batch),
                              "overlap_frac": metrics["overlap_frac"],
                              "wait_rollout_s": metrics["time_wait_rollout"],
                              "server_busy": cpu.busy, "others_busy": cpu.others})
            row = weight_columns(run.policy.model) | train_alone(run, cfg, self.pids)
            self.compiled = run.policy.compiled  # hardware.compile: true, or auto once it paid
        if not main:
            return {}
        timed = steps[cfg.bench.warmup:]
        row["train_ratio"] = statistics.median(s["train_s"] for s in timed) / row["train_alone_s"]
        return {**row, **medians(steps, cfg.bench.warmup), "threads": self.threads, "cpus": self.cpus,
                "dtype": dtype_name(self.precision.served), "compute_dtype": dtype_name(self.precision.compute),
                "master_dtype": dtype_name(self.precision.master), "compiled": self.compiled,
                **{k: statistics.median(s[k] for s in timed)
                   for k in ("overlap_frac", "wait_rollout_s", "server_busy", "others_busy")}}


def train_alone(run, cfg: DictConfig, pids: tuple[int, ...]) -> dict:
    """The train phase re-timed on one more rollout once vLLM is idle: the same work with no
    server competing for the cores. `train_ratio` = in-run `train_s` / this (target <= 1.2).
    As in a step, rank 0 draws the rollout and every trainer process trains its share."""
    step = cfg.train.steps + 1
    rollout = None
    if distributed.is_main():
        rollout, _ = run.sampler(step)
        wait_quiet(pids, cfg.bench.quiet_threshold, timeout_s=cfg.bench.quiet_timeout_s)
    rollout = distributed.broadcast_object(rollout)
    times = []
    with CpuMeter(pids) as cpu:
        for _ in range(cfg.bench.repeats):
            t = time.perf_counter()
            learn(run, rollout, step)
            times.append(time.perf_counter() - t)
    return {"train_alone_s": statistics.median(times), "alone_server_busy": cpu.busy}


def measure_trl(cfg: DictConfig, run_dir: Path, ours: Ours) -> dict:
    """TRL on the prompts our run drew (a fresh env with the same seed draws them again), once
    our server is idle; its CPU use during TRL's steps is recorded, not assumed."""
    env = instantiate(cfg.env)
    compute = (ours.precision or Precision.resolve(cfg.model.dtype, cfg.model.master_dtype, cfg.hardware.autocast,
                                                   cfg.hardware.device)).compute
    try:
        batches = [env.sample(cfg.train.prompts_per_step) for _ in range(cfg.train.steps)]
        waited = wait_quiet(ours.pids, cfg.bench.quiet_threshold, timeout_s=cfg.bench.quiet_timeout_s)
        with CpuMeter(ours.pids) as cpu:
            steps, model = trl_steps(cfg, model_path(cfg), batches, env, run_dir / "trl",
                                     ours.threads or torch.get_num_threads(), compute)
    finally:
        env.close()
    return {**weight_columns(model), **medians(steps, cfg.bench.warmup), "threads": torch.get_num_threads(),
            "dtype": dtype_name(compute), "compute_dtype": dtype_name(compute), "master_dtype": "float32",
            "cpus": len(os.sched_getaffinity(0)), "quiet_wait_s": waited, "server_busy": cpu.busy, "others_busy": cpu.others}


def cpu_set(cpus) -> str:
    """A CSV cell: `0,1`, or `all` where the config leaves the cores shared."""
    return cpu_list(cpus) if cpus else "all"


def started() -> int:
    """How many processes torchrun started, this one included (1: started alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def trainer_procs(cfg: DictConfig) -> int:
    """Trainer processes of this point: `hardware.trainer_procs`, else as many as were started."""
    procs = cfg.hardware.trainer_procs or started()
    if started() > 1 and procs != started():
        raise ValueError(f"hardware.trainer_procs={procs}, but torchrun started {started()} processes")
    return procs


def torchrun_command(procs: int, overrides: list[str], run_dir: Path) -> list[str]:
    """This benchmark as `procs` trainer processes on this node, with a Hydra job's overrides."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
            "-m", "experiments.step_time", *overrides, f"hydra.run.dir={run_dir}"]


def launch(cfg: DictConfig, run_dir: Path, base: dict, procs: int) -> list[dict]:
    """Run this job's point under torchrun in `run_dir`; the rows its rank 0 wrote there, or one
    error row naming the cause when torchrun ended without rows (a rank died)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    output = run_dir / "torchrun.log"
    command = torchrun_command(procs, list(HydraConfig.get().overrides.task), run_dir)
    log.info("%d trainer processes: %s (output: %s)", procs, " ".join(command), output)
    with open(output, "w") as out, subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT) as job:
        try:
            code = job.wait()
        except BaseException:
            job.terminate()  # torchrun stops its workers on SIGTERM; a SIGKILL would orphan them
            job.wait()
            raise
    written = run_dir / f"{cfg.bench.name}.csv"
    if written.exists():
        with open(written, newline="") as f:
            return list(csv.DictReader(f))
    tail = output.read_text(errors="replace").splitlines()[-60:]
    failure = RuntimeError("\n".join([f"torchrun --nproc_per_node={procs} exited {code} without a row", *tail]))
    return [{**base, "side": "ours", "run_dir": str(run_dir), "error": describe(failure, run_dir)}]


def measure(cfg: DictConfig, run_dir: Path, base: dict, procs: int) -> list[dict]:
    """Both sides in this process (one of `procs` trainer processes): ours, then TRL alone."""
    ours = Ours()
    rows = [measure_point(cfg, run_dir, {**base, "side": "ours"}, ours)]
    if cfg.bench.trl and procs > 1:
        log.warning("TRL's side not run: ours ran on %d trainer processes, TRL would on one "
                    "(its multi-process path, accelerate, is not driven here)", procs)
    elif cfg.bench.trl:
        trl = measure_point(cfg, run_dir, {**base, "side": "trl", "mode": "trl"},
                            lambda c, d: measure_trl(c, d, ours))
        rows.append(trl)
        if not rows[0]["error"] and not trl["error"]:
            for row in rows:
                row["ratio"] = trl["step_s"] / rows[0]["step_s"]
    return rows


@hydra.main(config_path="../conf", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> list[dict]:
    procs = trainer_procs(cfg)
    if cfg.bench.trl and procs == 1:
        require_trl()  # before a minute is spent on our side
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # Every step of the run is either warm-up or timed (the last step syncs, as in training).
    cfg.train.steps = cfg.bench.warmup + cfg.bench.repeats
    base = {"size": cfg.bench.size if cfg.model.tiny is not None else cfg.model.path, **config_columns(cfg), "prompts": cfg.train.prompts_per_step,
            "group_size": cfg.train.group_size, "max_tokens": cfg.rollout.max_tokens,
            "cpu": cpu_kind(), "cpu_bf16_native": cpu_bf16_native(),
            "mode": cfg.name, "trainer_procs": procs, "tp": cfg.hardware.vllm_tp, "dp": cfg.hardware.vllm_dp,
            "max_staleness": cfg.train.max_staleness, "trainer_cpus": cpu_set(cfg.hardware.trainer_cpus),
            "vllm_cpus": cpu_set(cfg.hardware.vllm_cpus), "compile": cfg.hardware.compile,
            "run_dir": str(run_dir)}
    if procs > started():  # started alone, asked for several: the point runs under torchrun
        rows = launch(cfg, run_dir / "torchrun", base, procs)
    else:
        rows = measure(cfg, run_dir, base, procs)
    if distributed.launch_rank() == 0:  # one row per side, from rank 0 (the group is closed by now)
        for row in rows:
            append_row(sweep_csv(cfg.bench.name), row)
    return rows


if __name__ == "__main__":
    main()
