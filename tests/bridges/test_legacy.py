"""mode=legacy keeps every resume checkpoint: the models it serves live in `<run_dir>/served/`.

It used to write them under `checkpoints/step-*` and delete every other `step-*` there, and the
checkpoint writer replaced the directory vLLM had been started from: a run with
`mode.sync_every=2 train.checkpoint_every=2 train.steps=4` ended with only `step-000004`.
"""

from __future__ import annotations

import json

import pytest

from conftest import make_cfg, run_precision
from grpo import checkpoint
from test_faults import QUIET, read_jsonl
from train import train


@pytest.mark.slow
def test_legacy_run_keeps_every_checkpoint(tmp_path):
    history = train(make_cfg("mode=legacy", "mode.sync_every=2", "train.checkpoint_every=2", "train.steps=4",
                             *QUIET), tmp_path)
    assert len(history) == 4

    saved = sorted((tmp_path / "checkpoints").iterdir())
    assert [p.name for p in saved] == ["step-000002", "step-000004"]
    for ckpt in saved:  # complete, and every file its manifest lists is there
        manifest = json.loads((ckpt / checkpoint.MARKER).read_text())
        assert manifest["step"] == int(ckpt.name[5:])
        assert manifest["files"] and all((ckpt / f).is_file() for f in manifest["files"])
    assert checkpoint.newest_complete(tmp_path) == saved[-1]

    # vLLM was restarted on the served copy of each sync; only the last copy is kept.
    syncs = read_jsonl(tmp_path / "sync.jsonl")
    tol = run_precision(tmp_path).probe_tolerance  # fp32, or bf16 where the CPU serves it (model.dtype=auto)
    assert [s["step"] for s in syncs] == [2, 4] and all(s["probe_max_diff"] <= tol for s in syncs)
    assert [p.name for p in (tmp_path / "served").iterdir()] == ["step-000004"]
    log = (tmp_path / "vllm.log").read_text()
    assert f"--model {tmp_path}/served/step-000002 " in log and f"--model {tmp_path}/served/step-000004 " in log
