"""One CSV per sweep, one row per grid point, safe to append from concurrent jobs.

Rows may bring columns the file does not have yet (an `error` row, a new bridge's extras): the
file is then rewritten with the union of the columns, under the same lock as appends.
"""

from __future__ import annotations

import csv
import fcntl
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode


def sweep_csv(name: str) -> Path:
    """`${hydra.sweep.dir}/<name>.csv` in a multirun, `<run dir>/<name>.csv` in a single run."""
    hc = HydraConfig.get()
    folder = hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.runtime.output_dir
    return Path(folder) / f"{name}.csv"


def append_row(path: Path, row: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows: list[dict] = []
        header: list[str] = []
        if path.exists() and path.stat().st_size:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                if not set(row) <= set(header):
                    rows = list(reader)
        new = [k for k in row if k not in header]
        if header and not new:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, header).writerow(row)
            return
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, header + new)
            writer.writeheader()
            writer.writerows(rows + [row])
        tmp.replace(path)
