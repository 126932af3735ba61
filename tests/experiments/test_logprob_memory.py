"""`python -m experiments.logprob_memory` at toy size: one fresh process per point, a CSV row each,
the chunked head's gradient the unchunked one's, and an over-budget point skipped, saying why."""

from __future__ import annotations

import csv

import pytest

from bench_cli import cli


def test_logprob_memory_runs_at_toy_size(tmp_path):
    out = tmp_path / "memory.csv"
    printed = cli("-m", "experiments.logprob_memory", "--vocab", "512", "--rows", "1,4", "--completion", "16",
                  "--chunks", "none,8", "--max-logits-gb", "0.00006", "--csv", str(out))
    rows = list(csv.DictReader(open(out)))
    assert [(r["rows"], r["chunk"]) for r in rows] == [("1", "none"), ("1", "8"), ("4", "none"), ("4", "8")]
    assert "--max-logits-gb" in rows[2]["skipped"] and "skipped" in printed  # 4 x 16 x 512 x 4 B > 0.00006 GB
    assert all(float(r["peak_mb"]) > float(r["loaded_mb"]) > 0 for r in (rows[0], rows[1], rows[3]))
    assert float(rows[1]["head_grad_norm"]) == pytest.approx(float(rows[0]["head_grad_norm"]), rel=1e-5)
    assert float(rows[1]["entropy_mean"]) == pytest.approx(float(rows[0]["entropy_mean"]), rel=1e-6)
