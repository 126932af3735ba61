"""The sweep CSV: rows with new columns widen the file, concurrent jobs lose no row."""

from __future__ import annotations

import csv
from multiprocessing import Pool

from runtime.csvlog import append_row


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_new_columns_widen_the_file_and_keep_old_rows(tmp_path):
    path = tmp_path / "s.csv"
    append_row(path, {"tp": 1, "tokens_per_s": 10.5})
    append_row(path, {"tp": 2, "error": "AssertionError: no NUMA node"})
    append_row(path, {"tp": 4, "tokens_per_s": 3.0})
    rows = read(path)
    assert list(rows[0]) == ["tp", "tokens_per_s", "error"]
    assert [(r["tp"], r["tokens_per_s"], r["error"]) for r in rows] == [
        ("1", "10.5", ""), ("2", "", "AssertionError: no NUMA node"), ("4", "3.0", "")]


def _job(args):
    path, worker = args
    for i in range(25):
        append_row(path, {"worker": worker, "i": i, **({"extra": i} if i % 10 == 0 else {})})


def test_concurrent_appends_lose_nothing(tmp_path):
    path = tmp_path / "s.csv"
    with Pool(4) as pool:
        pool.map(_job, [(path, w) for w in range(4)])
    rows = read(path)
    assert sorted((int(r["worker"]), int(r["i"])) for r in rows) == [(w, i) for w in range(4) for i in range(25)]
    assert sum(r["extra"] != "" for r in rows) == 12
