"""Test helper: benchmarks and runs are driven through their real command lines, as users run them."""

from __future__ import annotations

import subprocess
import sys

from hydra import compose, initialize_config_dir

from conftest import REPO

PRESETS = sorted((REPO / "conf" / "bench").glob("*.yaml"))


def bench_cfg(*overrides: str, hydra: bool = False):
    """The config `python -m experiments.<entry> <overrides>` runs with (conf/benchmark.yaml, the
    `bench` preset group on top of train.py's config); compose after the entry's `use_schema`."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="benchmark", overrides=list(overrides), return_hydra_config=hydra)


def cli(*args: str, timeout: float = 900) -> str:
    """Run `python <args>` from the repository root; fail with its output if it fails."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} -> {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


QUIET = ("log.wandb.mode=disabled", "log.progress=false")
