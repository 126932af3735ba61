"""scripts/smoke_check.py, the verdicts of scripts/gpu_smoke.sh: each check fails on the record
of the defect it is there for (sync.jsonl records as the bridges write them)."""

from __future__ import annotations

import importlib.util

from conftest import REPO

spec = importlib.util.spec_from_file_location("smoke_check", REPO / "scripts" / "smoke_check.py")
smoke_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(smoke_check)


def record(step: int, nbytes: int, gap: float = 0.01, moved: float | None = 0.05) -> dict:
    return {"step": step, "bytes": nbytes, "probe_max_diff": gap,
            "extra": {"attempts": 1, **({} if moved is None else {"served_moved": moved})}}


def failed(syncs, steps=2, in_place=True) -> list[str]:
    return [name for name, ok, _ in smoke_check.verdicts(syncs, steps, 0.15, 1e-3, in_place) if not ok]


def test_a_good_run_passes_every_check():
    assert failed([record(1, 1000), record(2, 900)]) == []


def test_each_check_fails_on_its_defect():
    assert failed([record(1, 1000)]) == ["syncs", "in_place"]  # a step without a sync
    assert failed([record(1, 1000), record(2, 1000)]) == ["in_place"]  # a full save at every sync
    assert failed([record(1, 1000), record(2, 900, gap=0.4)]) == ["probe_gap"]
    assert failed([record(1, 1000), record(2, 900, moved=0.0)]) == ["served_changed"]  # vLLM kept the old weights
    assert failed([record(1, 1000, moved=None), record(2, 900)]) == ["served_changed"]  # nothing to compare with
    assert failed([record(1, 1000), record(2, 1000)], in_place=False) == []  # modes without a mirror
