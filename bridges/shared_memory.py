"""Export a tensor's storage as a JSON-able handle, and attach to it from another process.

Torch only (no vLLM), so the vLLM worker extension, the trainer and the GPU test use the same code.
A handle names the storage, not a copy: CUDA IPC (`_share_cuda_`) on GPU, a named shared-memory
file (`_share_filename_cpu_`, file_system strategy) on CPU, because a file name can travel over
HTTP where a file descriptor cannot. Byte strings are base64-encoded for JSON.

Those files are RAM and outlive their creator when it is killed: torch removes one when the last
storage on it is freed or when its shm manager sees its clients go, and vLLM's shutdown SIGKILLs
its workers and the manager alike. So the exporting process records its files
(`register_segments`: a manifest `/dev/shm/grpo-segments-<pid>-<start time>.json`) and removes
them if it exits normally; the trainer removes those of a server it started when its run ends
(`SharedBridge.close`), and the next start removes those of a run killed before that
(`remove_stale`: no process has the owner's pid and start time any more).
"""

from __future__ import annotations

import atexit
import base64
import json
import multiprocessing.util
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

import torch

from runtime.procfs import STARTTIME, STATE, stat_fields

SHM = Path("/dev/shm")


def _encode(value: Any) -> Any:
    return {"b64": base64.b64encode(value).decode()} if isinstance(value, bytes) else value


def _decode(value: Any) -> Any:
    return base64.b64decode(value["b64"]) if isinstance(value, dict) else value


def export_tensor(tensor: torch.Tensor) -> dict:
    """Handle for `tensor`'s storage plus its view (shape, stride, offset).

    On CPU this moves the storage into shared memory in place (one copy, once): the tensor and
    every view of it keep working, but pointers taken earlier (packed GEMM weights) go stale.
    """
    storage = tensor.untyped_storage()
    if tensor.is_cuda:
        kind, parts = "cuda", storage._share_cuda_()
    elif tensor.device.type == "cpu":
        kind, parts = "cpu", storage._share_filename_cpu_()
    else:
        raise ValueError(f"cannot share a tensor on {tensor.device}: only cuda and cpu storages")
    return {
        "kind": kind,
        "storage": [_encode(p) for p in parts],
        "dtype": str(tensor.dtype),
        "shape": list(tensor.shape),
        "stride": list(tensor.stride()),
        "offset": tensor.storage_offset(),
    }


def attach_tensor(handle: dict, cuda_index: int | None = None) -> torch.Tensor:
    """A tensor over the exporter's storage (no copy): writes are seen by both processes.

    `cuda_index`: this process's index of the exporter's GPU, when CUDA_VISIBLE_DEVICES differ.
    """
    parts = [_decode(p) for p in handle["storage"]]
    dtype = getattr(torch, handle["dtype"].removeprefix("torch."))  # str() of the exported tensor's dtype
    offset = handle["offset"]
    if handle["kind"] == "cuda":
        parts[0] = parts[0] if cuda_index is None else cuda_index
        torch.cuda._lazy_init()
        storage = torch.UntypedStorage._new_shared_cuda(*parts)
    else:
        # The file is mapped directly, not through the exporter's torch_shm_manager: freeing a
        # storage attached through a manager that has exited (vLLM stopped) aborts the process.
        # torch keeps a refcount header before the data, so the data is the file's tail.
        _, name, nbytes = parts
        path = f"/dev/shm{name.decode()}"
        header = os.stat(path).st_size - nbytes
        storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=header + nbytes)
        offset += header // dtype.itemsize
    out = torch.empty(0, dtype=dtype, device=storage.device)
    return out.set_(storage, offset, handle["shape"], handle["stride"])


def segment_name(handle: dict) -> str | None:
    """The shared-memory file behind a CPU handle (None for CUDA)."""
    return _decode(handle["storage"][1]).decode() if handle["kind"] == "cpu" else None


def process_start(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot (None: no such process, or a dead one not yet
    reaped: a killed vLLM worker whose parents are gone stays a zombie until init reaps it): with
    the pid it names one process, even after the pid is reused."""
    fields = stat_fields(pid)
    return None if fields is None or len(fields) <= STARTTIME or fields[STATE] in ("Z", "X") else fields[STARTTIME]


def owner_tag(pid: int) -> str:
    """`<pid>-<start time>`: names a process's /dev/shm entries so a later start can tell whether
    their owner is gone (`owner_gone`)."""
    return f"{pid}-{process_start(pid)}"


def owner_gone(tag: str) -> bool:
    """Whether the process an `owner_tag` (possibly followed by `-<more>`) named has exited."""
    pid, start = tag.split("-")[:2]
    return process_start(int(pid)) != start


def manifest_path(pid: int) -> Path:
    return SHM / f"grpo-segments-{owner_tag(pid)}.json"


def remove_files(names: Iterable[str]) -> int:
    removed = 0
    for name in names:
        try:
            (SHM / name.lstrip("/")).unlink()
            removed += 1
        except OSError:  # gone already, or another user's
            pass
    return removed


def release_segments(manifest: Path) -> int:
    """Remove the files a manifest lists, then the manifest; returns how many files were removed."""
    try:
        names = json.loads(manifest.read_text())
    except (OSError, ValueError):
        names = []
    removed = remove_files(names)
    remove_files([manifest.name])
    return removed


def register_segments(handles: Iterable[dict]) -> Path:
    """Record the shared-memory files of `handles` (exported by this process) and remove them when
    this process exits normally (not when it is killed: see the module docstring)."""
    path = manifest_path(os.getpid())
    known = set(json.loads(path.read_text())) if path.exists() else set()
    first = not known
    known.update(filter(None, (segment_name(h) for h in handles)))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sorted(known)))
    os.replace(tmp, path)
    if first:
        # Runs at a normal exit, and when a multiprocessing child ends by SystemExit.
        multiprocessing.util.Finalize(None, release_segments, args=(path,), exitpriority=0)
    return path


def remove_stale() -> int:
    """Remove the files of every manifest whose owner process is gone; returns how many."""
    removed = 0
    for manifest in SHM.glob("grpo-segments-*.json"):
        if owner_gone(manifest.stem.removeprefix("grpo-segments-")):
            removed += release_segments(manifest)
    return removed


def owned_dir(prefix: str) -> Path:
    """A new directory in /dev/shm named after this process (`<prefix>-<pid>-<start>-<id>`), for
    files a local vLLM server reads at memory speed; those of owners that are gone are removed
    first. Its user removes it when done, or else this process's exit does (a killed process leaves it
    to the next call)."""
    for stale in SHM.glob(f"{prefix}-*"):
        if owner_gone(stale.name[len(prefix) + 1:]):
            shutil.rmtree(stale, ignore_errors=True)
    out = SHM / f"{prefix}-{owner_tag(os.getpid())}-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    return out
