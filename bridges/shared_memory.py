"""Export a tensor's storage as a JSON-able handle, and attach to it from another process.

Torch only (no vLLM), so the vLLM worker extension, the trainer and the GPU test use the same code.
A handle names the storage, not a copy: CUDA IPC (`_share_cuda_`) on GPU, a named shared-memory
file (`_share_filename_cpu_`, file_system strategy) on CPU, because a file name can travel over
HTTP where a file descriptor cannot. Byte strings are base64-encoded for JSON.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import torch

DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}


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
    dtype = DTYPES[handle["dtype"]]
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
