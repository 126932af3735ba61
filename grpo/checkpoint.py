"""Checkpoints that make a resumed run continue exactly where the saved one stopped.

`<run_dir>/checkpoints/step-XXXXXX/` holds the policy (`Policy.save`: the full model, or the
LoRA adapter), `trainer.pt` (optimizer, scheduler, torch/python RNG states, env cursor, step)
and, written last, `COMPLETE` (a JSON manifest). It is built in a `.tmp-*` directory, fsynced,
then renamed into place, so a crash mid-save leaves only a temp dir that is never picked.
Nothing else writes under `checkpoints/` (mode=legacy serves its copies from `<run_dir>/served/`),
so every complete checkpoint stays until the user removes it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

MARKER = "COMPLETE"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")) + [root]:
        _fsync(path)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """A temp dir beside `final` to fill; when the block ends it is fsynced and renamed to `final`,
    so `final` is always a whole save (a crash leaves only a `.tmp-*` dir, removed on an error).
    A `final` that already exists (a resumed run re-reaching a step) is renamed aside before it
    is deleted, so it is never a half-deleted dir that still looks complete."""
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(final.parent)  # the rename itself is durable
    shutil.rmtree(old, ignore_errors=True)


def save(run, step: int) -> Path:
    """Write the checkpoint of `step` atomically; returns its directory."""
    final = checkpoint_dir(run.run_dir, step)
    with atomic_dir(final) as tmp:
        run.policy.save(tmp / "policy")
        torch.save({
            "step": step,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "env": run.env.state_dict(),
            "vllm_restarts": run.guard.restarts,
        }, tmp / "trainer.pt")
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        _fsync_tree(tmp)
        (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}))  # last: after the files are durable
    return final


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def newest_complete(path: str | Path) -> Path:
    """`path` itself if it is a complete checkpoint, else the newest complete one under it
    (a run dir or its `checkpoints/`); partial saves (no marker, `.tmp-*`) are never picked."""
    path = Path(path)
    if is_complete(path):
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    done = sorted(p for p in root.glob("step-*") if is_complete(p))
    if not done:
        raise FileNotFoundError(f"resume={path}: no complete checkpoint (a step-* dir with {MARKER}) in {root}")
    return done[-1]


def saved_step(ckpt: Path) -> int:
    return json.loads((Path(ckpt) / MARKER).read_text())["step"]


def load_policy_weights(policy, ckpt: Path) -> None:
    """Copy the saved weights into the live model in place (optimizer and bridge keep their tensors)."""
    src = Path(ckpt) / "policy"
    if policy.lora is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(policy.model, load_file(src / "adapter_model.safetensors"))
        return
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(src, dtype=policy.model.dtype)
    policy.model.load_state_dict(saved.state_dict())


def load_trainer_state(run, ckpt: Path) -> int:
    """Restore optimizer, scheduler, env cursor and RNGs; returns the checkpoint's step."""
    state = torch.load(Path(ckpt) / "trainer.pt", weights_only=False)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.env.load_state_dict(state["env"])
    run.guard.restarts = state["vllm_restarts"]
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state["step"]
