"""`python -m experiments.compile_payback` at toy size: one CSV row with the figures
hardware.compile=auto's constants come from. Heavy: it compiles (~20-60 s on 2 cores)."""

from __future__ import annotations

import csv

import pytest

from bench_cli import cli


@pytest.mark.heavy
def test_compile_payback_runs_at_toy_size(tmp_path):
    out = tmp_path / "compile.csv"
    printed = cli("-m", "experiments.compile_payback", "--size", "toy", "--rows", "4", "--completion", "8",
                  "--steps", "1", "--csv", str(out))
    (row,) = list(csv.DictReader(open(out)))
    assert row["size"] == "toy" and float(row["eager_s"]) > 0 and float(row["compiled_s"]) > 0
    assert float(row["compile_s"]) > 0 and "pays back" in printed
    assert row["cpu_bf16_native"] in ("True", "False")
