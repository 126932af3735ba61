"""Everything a run records, in its Hydra run dir (what the notebooks read):

- `metrics.jsonl`: one JSON object per step (reward, loss, KL, policy entropy, clip fraction, logprob
  gap, completion lengths, truncated and tied-group fractions, tokens/s, time split
  generate/score/train/sync);
- `samples.jsonl`: prompt, completion, reward and advantage of every sample, every
  `log.samples_every` steps (also a wandb table, `samples`);
- `sync.jsonl`: one line per weight sync (mode, ms, bytes, probe difference);
- `events.jsonl`: things that happened besides steps (skipped steps, server restarts);
- `eval.jsonl`: one line per held-out eval (step, `eval/pass@1`, `eval/pass@<k>`, `eval/reward`,
  `eval/reward/<component>`), `eval_samples.jsonl` one row per eval prompt (lab/evaluate.py);
- wandb (offline by default), a progress bar and one human line per step on the console.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import OmegaConf
from torch import Tensor
from tqdm import tqdm

from grpo.batch import Rollout
from grpo.data import Completion


def episode_columns(completion: Completion) -> dict:
    """A multi-turn sample's whole episode: its messages, why it stopped, the loss mask [C] (1 on
    sampled ids, 0 on the env's) and its text in runs of that mask (what the run notebook colours)."""
    d = completion.dialogue
    if d is None:
        return {}
    return {"conversation": d.messages, "stop": d.stop, "mask": completion.mask, "spans": d.spans}


def _cell(value: Any) -> Any:
    """A wandb table cell: lists and dicts as JSON text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class PhaseTimer:
    """Wall time of a step's phases in seconds, under their metric names (`time_generate`, ...)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start  # summed over rounds


class RunLogger:
    def __init__(self, run_dir: Path, cfg, total_steps: int, start_step: int = 0):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.files = {name: open(self.run_dir / f"{name}.jsonl", "a")
                      for name in ("metrics", "samples", "sync", "events", "eval", "eval_samples")}
        self.bar = tqdm(total=total_steps, initial=start_step, desc="grpo", unit="step",
                        disable=not cfg.log.progress, dynamic_ncols=True)
        self.wandb = self._init_wandb(cfg)

    def _init_wandb(self, cfg) -> Optional[Any]:
        if cfg.log.wandb.mode == "disabled":
            return None
        import wandb

        return wandb.init(
            project=cfg.log.wandb.project,
            entity=cfg.log.wandb.entity,
            mode=cfg.log.wandb.mode,
            dir=str(self.run_dir),
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
        )

    def _write(self, name: str, record: dict) -> None:
        f = self.files[name]
        f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        f.flush()

    def step(self, step: int, metrics: dict) -> None:
        self._write("metrics", {"step": step, **metrics})
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        self.bar.update(1)
        self.bar.write(self.line(step, metrics))

    @staticmethod
    def line(step: int, m: dict) -> str:
        sync = f"{m['sync_ms']:.0f} ms" if "sync_ms" in m else "-"
        entropy = f" | ent {m['entropy']:.2f}" if "entropy" in m else ""
        return (
            f"step {step:4d} | reward {m['reward_mean']:.3f}±{m['reward_std']:.3f} | loss {m['loss']:+.4f} "
            f"| kl {m['kl']:.4f}{entropy} | gap {m['logprob_gap']:.1e} | clip {m['clip_frac']:.2f} | sync {sync} "
            f"| {m['tokens_per_s']:.0f} tok/s | gen {m['time_generate']:.2f}s train {m['time_train']:.2f}s"
        )

    def samples(self, step: int, rollout: Rollout, advantages: Tensor) -> None:
        """One row per completion (its prompt's last message, answer, text, reward, advantage; advantages
        [P*G] in rollout order) in samples.jsonl, and the same rows as wandb table `samples`."""
        rows = [{"step": step, "prompt": prompt.messages[-1]["content"], "answer": prompt.answer,
                 "completion": completion.text, "reward": reward, **episode_columns(completion)}
                for prompt, group, rewards in zip(rollout.prompts, rollout.groups, rollout.rewards.tolist())
                for completion, reward in zip(group, rewards)]
        for row, advantage in zip(rows, advantages.tolist(), strict=True):
            row["advantage"] = advantage
            self._write("samples", row)
        if self.wandb is not None:
            import wandb

            columns = list(rows[0])
            self.wandb.log({"samples": wandb.Table(columns=columns, data=[[_cell(r[c]) for c in columns] for r in rows])},
                           step=step)

    def eval(self, step: int, metrics: dict, rows: list[dict]) -> None:
        """A held-out eval after `step`: eval.jsonl, its per-prompt rows, wandb, a console line."""
        self._write("eval", {"step": step, **metrics})
        for row in rows:
            self._write("eval_samples", {"step": step, **row})
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        self.bar.write(self.eval_line(step, metrics))

    @staticmethod
    def eval_line(step: int, m: dict) -> str:
        """e.g. `eval 10 | pass@1 0.250 | pass@4 0.531 | reward 0.812 | digits 0.812 | 1.4s`."""
        figures = [f"{name[5:]} {value:.3f}" for name, value in m.items()
                   if name.startswith("eval/pass@") or name.startswith("eval/reward")]
        return " | ".join([f"eval {step:4d}", *figures, f"{m['eval/time_s']:.1f}s"]).replace("reward/", "")

    def sync(self, record: dict) -> None:
        self._write("sync", record)

    def event(self, step: int, kind: str, **info) -> None:
        self._write("events", {"step": step, "event": kind, **info})
        self.bar.write(f"step {step:4d} | {kind}: {info}")

    def close(self) -> None:
        self.bar.close()
        for f in self.files.values():
            f.close()
        if self.wandb is not None:
            self.wandb.finish()


class SilentLogger:
    """The logger of every rank but 0 under torchrun: rank 0 alone writes the run's record.
    RunLogger's methods that the loop calls, each doing nothing."""

    def step(self, step: int, metrics: dict) -> None:
        pass

    def samples(self, step: int, rollout: Rollout, advantages: Tensor) -> None:
        pass

    def eval(self, step: int, metrics: dict, rows: list[dict]) -> None:
        pass

    def sync(self, record: dict) -> None:
        pass

    def event(self, step: int, kind: str, **info) -> None:
        pass

    def close(self) -> None:
        pass
