"""GRPO against a real vLLM server: sample -> score -> advantages -> loss -> step -> sync -> log.

    python train.py                                   # tiny model, mode=reload, synthetic env, CPU
    python train.py mode=lora env=gsm8k               # another bridge, another env
    python train.py -m mode=reload,legacy train.steps=20   # a Hydra multirun sweep

Every part is chosen by config (`_target_` + `hydra.utils.instantiate`); this file only wires
them together and runs the loop. Outputs land in the Hydra run dir (see runtime/logger.py).
"""

from __future__ import annotations

import math

import hydra
from omegaconf import DictConfig

from lab.loop import train
from runtime.config import register_configs

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    history = train(cfg)
    last = history[-min(5, len(history)):]
    return sum(m["reward_mean"] for m in last) / max(len(last), 1) if history else math.nan


if __name__ == "__main__":
    main()
