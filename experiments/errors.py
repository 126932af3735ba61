"""A failed grid point as one CSV cell: the line that names the cause, full traceback on disk."""

from __future__ import annotations

import re
import traceback
from pathlib import Path

from hydra.errors import InstantiationException

# A vLLM start error's root cause is the first `XxxError: ...` line of its log (the last lines
# only say that the engine core failed).
_CAUSE = re.compile(r"^(?:\(\w+ pid=\d+\) )?(?:ERROR [^\]]*\] )?\s*(\w+(?:Error|Exception): .*)$")


def describe(exc: BaseException, run_dir: Path, width: int = 300) -> str:
    if isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__  # Hydra's wrapper; the bridge's own error names the cause
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.txt").write_text("".join(traceback.format_exception(exc)))
    log = run_dir / "vllm.log"
    text = str(exc) + ("\n" + log.read_text(errors="replace") if log.exists() else "")
    causes = [m.group(1) for line in text.splitlines() if (m := _CAUSE.match(line.strip()))]
    root = next((c for c in causes if "Engine core initialization failed" not in c), None)
    text = root or (str(exc).splitlines() or [""])[0]
    hint = getattr(exc, "hint", "")  # our config key for the cause (serving.server.start_hint) goes first
    return f"{type(exc).__name__}: {f'{hint} [{text}]' if hint else text}"[:width]


def measure_point(cfg, run_dir: Path, row: dict, measure) -> dict:
    """Measure into `row`; a failure becomes the row's `error` cell instead of ending the sweep."""
    try:
        row |= measure(cfg, run_dir)
        row["error"] = ""
    except Exception as exc:  # one bad grid point must not end the sweep
        row["error"] = describe(exc, run_dir)
    return row


def record_point(cfg, run_dir: Path, row: dict, measure) -> dict:
    """Measure one grid point into `row` and append it to the sweep CSV."""
    from runtime.csvlog import append_row, sweep_csv

    append_row(sweep_csv(cfg.bench.name), measure_point(cfg, run_dir, row, measure))
    return row
