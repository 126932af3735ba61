"""The packages import downward only: the algorithm at the ground, then process plumbing, then
serving, then the bridges and envs, then the run (lab/), then the entry points. Checked on every
import statement, function-level ones included, so a cycle cannot creep back in (that nothing
imports the Hydra script is tests/test_imports.py's)."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO
from support import imported_modules

LAYERS = {"grpo": 0, "runtime": 1, "serving": 2, "bridges": 3, "envs": 3, "lab": 4, "experiments": 5, "train": 5}
CONFIG = ("hydra", "omegaconf")  # the algorithm reads no config: its functions take values


def imports(path: Path) -> set[str]:
    """Top-level packages of everything `path` imports, anywhere in the file."""
    return {module.split(".")[0] for _, module in imported_modules(path.read_text())}


def sources() -> list[tuple[str, Path]]:
    files = [("train", REPO / "train.py")]
    for package in LAYERS:
        files += [(package, f) for f in sorted((REPO / package).glob("*.py"))]
    return files


def test_every_import_goes_downward():
    upward = [f"{f.relative_to(REPO)} imports {name}" for package, f in sources() for name in imports(f)
              if name in LAYERS and LAYERS[name] > LAYERS[package]]
    assert upward == []


def test_the_algorithm_reads_no_config_and_starts_no_process():
    offending = [f"{f.relative_to(REPO)}: {sorted(imports(f) & {*CONFIG, 'subprocess', 'multiprocessing'})}"
                 for package, f in sources() if package == "grpo" and imports(f) & {*CONFIG, "subprocess", "multiprocessing"}]
    assert offending == []
