"""The `bench` block of a benchmark's config, and how it joins the training schema.

A benchmark composes the same `conf/` groups as `train.py` (model, mode, env, hardware) plus a
`bench` block. Each entry point registers `Config + bench` as the root schema of its own process,
so a typo in `bench.*` fails at start by name, and `runtime/config.py` stays the training schema.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from runtime.config import Config


@dataclass
class ThroughputBench:
    """Workload sizes come from the training keys (train.prompts_per_step, train.group_size,
    rollout.max_tokens) so a sweep of them means what it means in training."""

    name: str = "rollout_throughput"  # the CSV `<sweep dir>/<name>.csv`
    repeats: int = 3  # timed calls per engine; figures are medians
    warmup: int = 1  # untimed calls first (vLLM compiles, HF allocates)
    hf_baseline: bool = True  # time HF `generate` on the same prompts: vLLM's gain as a ratio
    quiet_threshold: float = 0.05  # cores the vLLM server may still use when an HF call starts
    quiet_timeout_s: float = 60.0


@dataclass
class SyncBench:
    name: str = "sync_latency"
    repeats: int = 3  # timed syncs; figures are medians
    noise: float = 1e-3  # weights move by this much before each sync, a stand-in for a step


@dataclass
class SyncGenerateBench:
    """A sync and the generation after it (experiments/sync_generate.py); the workload is the
    training keys' (train.prompts_per_step, train.group_size, rollout.max_tokens)."""

    name: str = "sync_generate"
    repeats: int = 5  # timed steps; figures are medians
    warmup: int = 1  # untimed steps first (the first sync loads an adapter, vLLM warms up)
    noise: float = 1e-3


@dataclass
class StepTimeBench:
    """One GRPO step, ours against TRL's GRPOTrainer, on one model size (`size`, a key of `sizes`:
    the preset maps it to model.tiny.*)."""

    name: str = "step_time"
    size: str = "toy"
    sizes: dict[str, Any] = field(default_factory=dict)
    warmup: int = 2  # untimed steps first, on both sides (allocation, first-call costs)
    repeats: int = 3  # timed steps per side; figures are medians
    trl: bool = True  # also run TRL (the `bench` extra) beside a one-process step; false: our step alone
    quiet_threshold: float = 0.05  # cores the vLLM server may still use when TRL starts
    quiet_timeout_s: float = 60.0


@dataclass
class TimeToAccuracyBench:
    """Held-out pass@1 against seconds and steps, ours against TRL (experiments/time_to_accuracy.py)."""

    name: str = "time_to_accuracy"
    trl: bool = True  # also run TRL's GRPOTrainer on the same prompts (the `bench` extra)
    target: float = 0.6  # the pass@1 whose first crossing the summary times on each side


@dataclass
class MultiTurnBench:
    """A multi-turn step against its turns' generation alone (experiments/multiturn_overhead.py)."""

    name: str = "multiturn_overhead"
    train_steps: int = 8  # untimed training steps first, until the model calls its tool every turn
    repeats: int = 3  # timed steps; figures are medians


def use_schema(bench: type) -> None:
    """Make `Config + bench: <bench>` the root schema that conf/config.yaml composes onto."""
    schema = dataclasses.make_dataclass(
        f"{bench.__name__}Config", [("bench", bench, dataclasses.field(default_factory=bench))], bases=(Config,)
    )
    ConfigStore.instance().store(name="config_schema", node=schema)


# Presets scale tiny models by width: intermediate = 2 * hidden, heads = hidden / 64.
for _name, _fn in {"mul": lambda a, b: int(a) * int(b), "div": lambda a, b: int(a) // int(b)}.items():
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
