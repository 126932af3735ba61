"""Reading back what runtime/logger.py writes: the one parser of a run's `*.jsonl` records.

Every record is one JSON object per line; non-finite floats are logged as the strings "nan",
"inf", "-inf" (JSON has no such numbers): `read_jsonl` keeps them strings, `read_table` (the
DataFrame the notebooks and sweep summaries read) turns them back into floats.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import pandas as pd


def read_jsonl(path: Union[str, Path], optional: bool = False) -> list[dict]:
    """The records of a `*.jsonl` file in order, blank lines skipped. A missing file is
    FileNotFoundError, or no records if `optional` (e.g. eval.jsonl of a run without eval)."""
    path = Path(path)
    if not path.is_file():
        if optional:
            return []
        raise FileNotFoundError(f"{path}: no such file")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_table(path: Union[str, Path], optional: bool = False) -> pd.DataFrame:
    """One row per record; non-finite floats (logged as "nan"/"inf" strings) become floats again.
    A missing file is FileNotFoundError, or an empty table if `optional` (e.g. eval.jsonl of a run
    without eval)."""
    df = pd.DataFrame(read_jsonl(path, optional=optional))
    for column in df.columns:
        if df[column].dtype == object:
            numbers = pd.to_numeric(df[column], errors="coerce")
            text = df[column].astype(str).str.lower()
            if not (numbers.isna() & df[column].notna() & (text != "nan")).any():
                df[column] = numbers
    return df
