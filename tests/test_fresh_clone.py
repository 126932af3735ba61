"""A clone with nothing beside it trains: the default job runs offline from a copy of the
repository's files in an empty folder (GSM8K, the tiny tokenizer's corpus, travels in the repo)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from runtime.records import read_jsonl

pytestmark = pytest.mark.slow


def copy_checkout(dest: Path) -> Path:
    """The repository's files as a clone of this working tree holds them: tracked ones, and
    untracked ones git does not ignore (no .cache, outputs or .venv)."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if (REPO / name).is_file():  # a tracked file deleted in the working tree is not there
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def test_lone_clone_runs_the_default_job_offline(tiny_model_path, tmp_path):
    clone = copy_checkout(tmp_path / "lone" / "grpo-lab")
    assert sorted(p.name for p in clone.parent.iterdir()) == ["grpo-lab"]  # no ../shared beside it
    # The tiny model built here, copied in: the clone's config must name the same cache key (the
    # key holds no path) and use it, not build another (tests/test_tiny_model.py builds the
    # tokenizer from the repository alone and checks it is this one).
    models = clone / ".cache" / "models"
    shutil.copytree(tiny_model_path, models / Path(tiny_model_path).name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of this checkout
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "train.py", "train.steps=3", "eval.enabled=false", "log.wandb.mode=disabled",
                           "log.progress=false", "hydra.run.dir=run"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == [Path(tiny_model_path).name]
    metrics = read_jsonl(clone / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # Step 1 samples the untrained model (seeded): README's first reward of the default run.
    assert round(metrics[0]["reward_mean"], 3) == 0.086, metrics[0]["reward_mean"]
