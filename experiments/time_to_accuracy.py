"""Time to accuracy, ours against TRL's `GRPOTrainer`: held-out greedy pass@1 against wall-clock
seconds and against steps, from the same warm start, one Hydra job per seed.

    python -m experiments.time_to_accuracy -m bench=time_to_accuracy           # seeds 0,1,2, mode=reload
    python -m experiments.time_to_accuracy -m bench=time_to_accuracy mode=lora train.seed=0

Both sides start from the same model dir (model=tiny_arith: the cached SFT warm start), train on
env=arith with the same prompts per step (in the same order), group size, completion length,
learning rate, loss options and compute dtype (TRL side: experiments/trl_grpo.py, CPU, HF
generate, no vLLM). Ours runs as train.py does (`lab.loop.train`) and evaluates on its vLLM server
every `eval.every` steps (lab/evaluate.py); TRL is evaluated at the same steps, between its steps,
on the same held-out prompts with the same exact-match (the env's `success` of an HF greedy
completion at the precision our server serves: lab/sft.py `greedy_pass_at_1`). Seconds are the
sum of the steps' wall time before the eval, evals excluded, on both sides; our server is idle
while TRL runs.

Rows (`<sweep dir>/time_to_accuracy.csv`): side, seed, step, seconds, pass@1, and each side's
time split per step so far (generate/score/train/sync). `bench.target`: the pass@1 each side's
curve is read at for the time-to-target summary (`time_to_accuracy_summary.csv`, written with the
plot when the sweep ends: experiments/plot.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from transformers import TrainerCallback

from envs.base import Env
from experiments.curves import eval_curve
from experiments.errors import describe
from experiments.schema import TimeToAccuracyBench, use_schema
from experiments.trl_grpo import require_trl, trl_steps
from grpo.precision import Precision, cpu_bf16_native, dtype_name
from lab.loop import train
from lab.server import model_path
from lab.sft import greedy_pass_at_1
from runtime.csvlog import append_row, sweep_csv

BENCH = TimeToAccuracyBench
use_schema(BENCH)


def ours(cfg: DictConfig, run_dir: Path) -> tuple[list[dict], Precision]:
    """Our run as train.py runs it; one row per eval (experiments/curves.py `eval_curve`)."""
    train(cfg, run_dir)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    precision = Precision.from_dict(next(e for e in events if e["event"] == "precision"))
    return [{**row, "dtype": dtype_name(precision.compute)} for row in eval_curve(run_dir)], precision


class HeldOut(TrainerCallback):
    """TRL's held-out greedy pass@1 at step 0, every `every` steps and the last, between steps
    (registered after the step timer, so its time is in no step)."""

    def __init__(self, trainer, env: Env, prompts, max_tokens: int, every: int, precision: Precision, timer):
        self.trainer, self.env, self.prompts, self.max_tokens, self.every = trainer, env, prompts, max_tokens, every
        self.precision, self.timer, self.rows = precision, timer, []

    def measure(self, step: int) -> None:
        model = self.trainer.model
        accuracy, _ = greedy_pass_at_1(model, self.trainer.processing_class, self.env, self.prompts, self.max_tokens,
                                       self.precision.served_context(next(model.parameters()).device))
        done = self.timer.steps
        self.rows.append({"step": step, "seconds": sum(s["step_s"] for s in done), "pass@1": accuracy,
                          **{col: sum(s[col] for s in done) for col in ("generate_s", "score_s", "train_s", "sync_s")}})

    def on_train_begin(self, args, state, control, **kwargs):
        self.measure(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.measure(state.global_step)


def theirs(cfg: DictConfig, run_dir: Path, precision: Precision) -> list[dict]:
    """TRL on the prompts our run drew (a fresh env with the same seed draws them again)."""
    env = instantiate(cfg.env)
    try:
        batches = [env.sample(cfg.train.prompts_per_step) for _ in range(cfg.train.steps)]
        held_out = env.eval_prompts(cfg.eval.split, cfg.eval.num_prompts)
        rows: list[dict] = []

        def add_eval(trainer, timer):
            callback = HeldOut(trainer, env, held_out, cfg.eval.max_tokens or cfg.rollout.max_tokens,
                               cfg.eval.every, precision, timer)
            rows.append(callback)
            return callback

        trl_steps(cfg, model_path(cfg), batches, env, run_dir / "trl", torch.get_num_threads(), precision.compute,
                  callbacks=[add_eval])
        return rows[0].rows
    finally:
        env.close()


def record(cfg: DictConfig, base: dict, side: str, measure) -> object:
    """Run one side; its rows into the sweep CSV (a failure: one row with its `error`, then raised)."""
    try:
        rows, out = measure()
    except Exception as exc:
        append_row(sweep_csv(cfg.bench.name), {**base, "side": side, "error": describe(exc, Path(base["run_dir"]))})
        raise
    for row in rows:
        append_row(sweep_csv(cfg.bench.name), {**base, "side": side, **row, "error": ""})
    return out


@hydra.main(config_path="../conf", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.bench.trl:
        require_trl()  # before a minute is spent on our side
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    base = {"seed": cfg.train.seed, "mode": cfg.name, "prompts": cfg.train.prompts_per_step,
            "group_size": cfg.train.group_size, "max_tokens": cfg.rollout.max_tokens, "lr": cfg.optimizer.lr,
            "loss_type": cfg.loss.loss_type, "cpu_bf16_native": cpu_bf16_native(), "run_dir": str(run_dir)}
    precision = record(cfg, base, "ours", lambda: ours(cfg, run_dir))
    if cfg.bench.trl:
        dtype = dtype_name(precision.compute)
        record(cfg, base, "trl", lambda: ([{**row, "dtype": dtype} for row in theirs(cfg, run_dir, precision)], None))


if __name__ == "__main__":
    main()
