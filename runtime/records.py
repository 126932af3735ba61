"""Reading back what runtime/logger.py writes: the one parser of a run's `*.jsonl` records.

Every record is one JSON object per line; non-finite floats are logged as the strings "nan",
"inf", "-inf" (JSON has no such numbers) and stay strings here. experiments/outputs.py builds its
DataFrame on this and turns them back into floats.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union


def read_jsonl(path: Union[str, Path], optional: bool = False) -> list[dict]:
    """The records of a `*.jsonl` file in order, blank lines skipped. A missing file is
    FileNotFoundError, or no records if `optional` (e.g. eval.jsonl of a run without eval)."""
    path = Path(path)
    if not path.is_file():
        if optional:
            return []
        raise FileNotFoundError(f"{path}: no such file")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
