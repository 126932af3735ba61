"""Reading what runs and sweeps wrote (runtime/logger.py, runtime/csvlog.py): the notebooks'
only inputs. A path the user typed starts from the directory they typed it in (`base`: the cwd,
or a notebook's `shell_dir()`); one not given means the newest under that directory's outputs/ or
multirun/, where train.py writes. A path that names nothing is an error naming it, never an empty
table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pandas as pd
from omegaconf import DictConfig, OmegaConf



def shell_dir() -> Path:
    """The directory the user's shell was in: jupyter starts a kernel in the notebook's folder,
    but the kernel inherits the shell's $PWD (the cwd where that is unset)."""
    return Path(os.environ.get("PWD") or os.getcwd())


def typed_path(path: str | Path, base: Optional[str | Path] = None) -> Path:
    """`path` as the user typed it, made absolute: a relative one starts from `base` (default:
    the cwd). Raises FileNotFoundError naming both forms if it names nothing."""
    found = Path(base or os.getcwd()) / Path(path).expanduser()
    if not found.exists():
        raise FileNotFoundError(f"{path}: no such file or directory ({found})")
    return found


def newest_parent(root: Path, pattern: str) -> Path:
    """Directory of the most recently written file matching `pattern` under `root`."""
    found = sorted(Path(root).glob(f"**/{pattern}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {pattern} under {root}: run something first or give the path")
    return found[-1].parent


def run_dir(path: Optional[str] = None, base: Optional[str | Path] = None) -> Path:
    """A train.py run dir (it holds metrics.jsonl); None: the newest under `base`/outputs."""
    if not path:
        return newest_parent(Path(base or os.getcwd()) / "outputs", "metrics.jsonl")
    found = typed_path(path, base)
    if not (found / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{path}: not a run dir, it holds no metrics.jsonl ({found})")
    return found


def sweep_dir(path: Optional[str] = None, base: Optional[str | Path] = None) -> Path:
    """A sweep dir (it holds a *.csv); None: the newest under `base`/multirun."""
    if not path:
        return newest_parent(Path(base or os.getcwd()) / "multirun", "*.csv")
    found = typed_path(path, base)
    if not any(found.glob("*.csv")):
        raise FileNotFoundError(f"{path}: not a sweep dir, it holds no *.csv ({found})")
    return found


def run_config(folder: Path) -> Optional[DictConfig]:
    """The run's composed config as Hydra saved it (absent for `train()` called without Hydra)."""
    path = Path(folder) / ".hydra" / "config.yaml"
    return OmegaConf.load(path) if path.exists() else None


def sweep_tables(folder: Path) -> dict[str, pd.DataFrame]:
    """Every CSV of a sweep dir by name: `rollout_throughput`, `sync_latency`, ..."""
    return {p.stem: pd.read_csv(p) for p in sorted(Path(folder).glob("*.csv"))}
