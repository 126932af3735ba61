"""Models built locally once and cached by a key (the tiny model, a warm start): the build runs
under one lock per cache and into a temporary dir renamed into place, so concurrent processes
build it once and no reader ever sees half a model."""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path
from typing import Callable

from grpo import REPO_ROOT

DEFAULT_CACHE = REPO_ROOT / ".cache" / "models"


def built_once(name: str, build: Callable[[Path], None], cache_dir: str | Path | None = None) -> Path:
    """`<cache>/<name>/`, made by `build(empty dir)` if no process has made it yet."""
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / name
    if (out / "model.safetensors").exists():
        return out
    with open(cache / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "model.safetensors").exists():
            tmp = cache / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            build(tmp)
            tmp.rename(out)
    return out
