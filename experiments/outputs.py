"""Reading what runs and sweeps wrote (grpo/logger.py, experiments/csvlog.py): the notebooks'
only inputs. A path not given means the newest one under the repository's outputs/ or multirun/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from grpo import REPO_ROOT


def newest_parent(root: Path, pattern: str) -> Path:
    """Directory of the most recently written file matching `pattern` under `root`."""
    found = sorted(Path(root).glob(f"**/{pattern}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {pattern} under {root}: run something first or give the path")
    return found[-1].parent


def run_dir(path: Optional[str] = None) -> Path:
    return Path(path) if path else newest_parent(REPO_ROOT / "outputs", "metrics.jsonl")


def sweep_dir(path: Optional[str] = None) -> Path:
    return Path(path) if path else newest_parent(REPO_ROOT / "multirun", "*.csv")


def read_jsonl(path: Path) -> pd.DataFrame:
    """One row per line; non-finite floats (logged as "nan"/"inf" strings) become floats again."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()] if Path(path).exists() else []
    df = pd.DataFrame(rows)
    for column in df.columns:
        if df[column].dtype == object:
            numbers = pd.to_numeric(df[column], errors="coerce")
            text = df[column].astype(str).str.lower()
            if not (numbers.isna() & df[column].notna() & (text != "nan")).any():
                df[column] = numbers
    return df


def run_config(folder: Path) -> Optional[DictConfig]:
    """The run's composed config as Hydra saved it (absent for `train()` called without Hydra)."""
    path = Path(folder) / ".hydra" / "config.yaml"
    return OmegaConf.load(path) if path.exists() else None


def sweep_tables(folder: Path) -> dict[str, pd.DataFrame]:
    """Every CSV of a sweep dir by name: `rollout_throughput`, `sync_latency`, ..."""
    return {p.stem: pd.read_csv(p) for p in sorted(Path(folder).glob("*.csv"))}
