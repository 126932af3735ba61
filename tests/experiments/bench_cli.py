"""Test helper: benchmarks and runs are driven through their real command lines, as users run them."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

PRESETS = sorted((REPO / "conf" / "experiment").glob("*.yaml"))


def cli(*args: str, timeout: float = 900) -> str:
    """Run `python <args>` from the repository root; fail with its output if it fails."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} -> {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


QUIET = ("log.wandb.mode=disabled", "log.progress=false")
