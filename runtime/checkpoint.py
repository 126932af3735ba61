"""Checkpoints that make a resumed run continue exactly where the saved one stopped.

`<run_dir>/checkpoints/step-XXXXXX/` holds the policy (`Policy.save`: the full model, or the
LoRA adapter), `trainer.pt` (the step, the optimizer, and every stateful part's `state_dict()`: scheduler, env
cursor, loss, guard, rollouts in flight, RNGs)
and, written last, `COMPLETE` (a JSON manifest). It is built in a `.tmp-*` directory, fsynced,
then renamed into place, so a crash mid-save leaves only a temp dir that is never picked.
Nothing else writes under `checkpoints/` (mode=legacy serves its copies from `<run_dir>/served/`),
so every complete checkpoint stays until the user removes it.

With several trainer processes (torchrun), the policy (trainable parameters) and the optimizer
are a `torch.distributed.checkpoint` in `dcp/` instead: every rank writes its own shards, no rank
gathers the model, and a run may resume on another number of processes. Rank 0 writes
`trainer.pt` (without the optimizer) and the marker, after every rank's shards are written.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path
from dataclasses import dataclass
from typing import Iterator, Mapping, Protocol

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from runtime import distributed

MARKER = "COMPLETE"
SHARDED = "dcp"  # the torch.distributed.checkpoint of a run with several trainer processes
# What a sharded checkpoint holds of the model: what trains (LoRA: the adapter, not the frozen base).
TRAINED = StateDictOptions(ignore_frozen_params=True)
# Loading it leaves the frozen parameters as built; dcp.load already fails on a trained one missing.
LOAD_TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)


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


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RandomState:
    """The torch and python RNGs as a part with state: restored last, so the run draws what the
    saved one would have drawn, whatever building it drew."""

    def state_dict(self) -> dict:
        return {"torch": torch.get_rng_state(), "python": random.getstate()}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])


@dataclass(frozen=True)
class Saved:
    """A complete checkpoint, read once: its step, and each part's state by name."""

    path: Path
    step: int
    parts: dict[str, dict]

    @property
    def sharded(self) -> bool:
        return (self.path / SHARDED).is_dir()


def _mark_complete(tmp: Path, step: int) -> None:
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    _fsync_tree(tmp)
    (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}))  # last: after the files are durable


def save(run_dir: Path, step: int, policy, optimizer, parts: Mapping[str, Stateful]) -> Path:
    """Write the checkpoint of `step` atomically: the policy's weights, the optimizer, and every
    part's `state_dict()` (scheduler, env cursor, loss, guard, rollouts in flight, RNGs); returns
    its directory."""
    final = checkpoint_dir(run_dir, step)
    states = {"step": step, **{name: part.state_dict() for name, part in parts.items()}}
    if distributed.world_size() > 1:
        return save_sharded(policy, optimizer, states, step, final)
    with atomic_dir(final) as tmp:
        policy.save(tmp / "policy")
        torch.save({**states, "optimizer": optimizer.state_dict()}, tmp / "trainer.pt")
        _mark_complete(tmp, step)
    return final


def _sharded_state(policy, optimizer) -> dict:
    model, optim = get_state_dict(policy.model, optimizer, options=TRAINED)
    return {"model": model, "optimizer": optim}


def save_sharded(policy, optimizer, states: dict, step: int, final: Path) -> Path:
    """Every rank writes its shards into rank 0's temp dir (a filesystem all ranks see); rank 0
    marks it complete once `dcp.save` has returned, i.e. once every rank's files are written, and
    renames it into place. A rank dying mid-save leaves a `.tmp-*` dir without a marker."""
    main = distributed.is_main()
    with atomic_dir(final) if main else nullcontext() as tmp:
        tmp = Path(distributed.broadcast_object(str(tmp) if main else None))
        dcp.save(_sharded_state(policy, optimizer), checkpoint_id=tmp / SHARDED)
        if main:
            torch.save(states, tmp / "trainer.pt")
            _mark_complete(tmp, step)
    distributed.barrier()  # no rank goes on before the checkpoint is in place
    return final


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def newest_complete(path: str | Path) -> Path:
    """`path` itself if it is a complete checkpoint, else the newest complete one under it
    (a run dir or its `checkpoints/`); partial saves (no marker, `.tmp-*`) are never picked.
    A relative `path` starts from the cwd: where the command was typed (Hydra's chdir=false)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"resume={path}: no such file or directory ({path.absolute()})")
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
    if (Path(ckpt) / SHARDED).is_dir():
        state = {"model": get_model_state_dict(policy.model, options=TRAINED)}
        dcp.load(state, checkpoint_id=Path(ckpt) / SHARDED)
        set_model_state_dict(policy.model, state["model"], options=LOAD_TRAINED)
        return
    src = Path(ckpt) / "policy"
    if policy.lora is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(policy.model, load_file(src / "adapter_model.safetensors"))
        return
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(src, dtype=policy.model.dtype)
    policy.model.load_state_dict(saved.state_dict())


def read(ckpt: Path) -> Saved:
    """The checkpoint's trainer state, read once (its policy weights: `load_policy_weights`)."""
    state = torch.load(Path(ckpt) / "trainer.pt", weights_only=False)
    return Saved(Path(ckpt), state.pop("step"), state)


def restore(saved: Saved, policy, optimizer, parts: Mapping[str, Stateful]) -> None:
    """Load the optimizer and every part from `saved`, in `parts`' order (put the RNGs last)."""
    if saved.sharded:
        sharded = _sharded_state(policy, optimizer)
        dcp.load(sharded, checkpoint_id=saved.path / SHARDED)
        set_state_dict(policy.model, optimizer, model_state_dict=sharded["model"],
                       optim_state_dict=sharded["optimizer"], options=LOAD_TRAINED)
    else:
        optimizer.load_state_dict(saved.parts["optimizer"])
    for name, part in parts.items():
        part.load_state_dict(saved.parts[name])
