"""A checkpoint directory rewritten in place: the reload bridge's weights at memcpy speed.

`save_pretrained` serialises every tensor into new files each sync: ~0.9 s for 343 MB (an 85M
fp32 model) on this CPU, whether the target is disk or /dev/shm. Between syncs only the values
change (names, dtypes and shapes are the model's), so after the first full save the mirror maps
each safetensors file once and copies every tensor's bytes over its old bytes at the offsets
the file's header gives, skipping tensors whose bytes are already there (a LoRA merge changes only
the targeted modules; comparing stops at the first differing word, so a changed tensor costs
little more than its copy). vLLM's `reload_weights` reads the same files it would have read
after a fresh save. Any change of names, dtypes or shapes falls back to a full save.

Tied weights (Qwen2.5 ties lm_head to the embedding): `save_pretrained` writes the shared tensor
once, so the state-dict keys that alias an earlier key's memory are dropped before comparing
with the saved layout (`distinct`); vLLM ties them again when it loads.

A model sharded over trainer processes (runtime/distributed.py) never exists whole on one rank:
`allocate` lays the file out from the tensors' names, dtypes and global shapes alone, and
`write_part` copies each gathered bucket into it.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path
from typing import Optional

import torch

from runtime import distributed

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def tensor_slots(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, start, end) byte range in the file, from its header."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    return {name: (SAFETENSORS_DTYPES[meta["dtype"]], tuple(meta["shape"]),
                   base + meta["data_offsets"][0], base + meta["data_offsets"][1])
            for name, meta in header.items() if name != "__metadata__"}


def storage_key(tensor: torch.Tensor) -> tuple:
    """Where a tensor's values live (its local shard's, for a sharded model): equal for tensors
    that alias each other, as a tied lm_head.weight and the embedding do."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.device, local.data_ptr(), tensor.dtype, tuple(tensor.shape), local.stride()


def distinct(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` less each key whose tensor is an earlier key's memory (a tied lm_head.weight
    is the embedding's), as `save_pretrained` leaves them out of the file."""
    seen, kept = set(), {}
    for name, tensor in state_dict.items():
        where = storage_key(tensor)
        if tensor.numel() and where in seen:
            continue
        seen.add(where)
        kept[name] = tensor
    return kept


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality of two uint8 tensors, compared as 8-byte words when both allow (byte
    by byte is ~4x slower). -0.0 and 0.0, or two NaNs, differ here, as they do in the file."""
    if a.numel() % 8 == 0 and a.data_ptr() % 8 == 0 and b.data_ptr() % 8 == 0:
        a, b = a.view(torch.int64), b.view(torch.int64)
    return a.equal(b)


class SafetensorsMirror:
    """`write(model, state_dict)` leaves `out` holding `state_dict` as an HF checkpoint."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.in_place = False  # whether the last `write` copied in place
        self.layout: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        self.maps: dict[Path, mmap.mmap] = {}

    def write(self, model, state_dict: dict[str, torch.Tensor]) -> int:
        """The bytes written: the changed tensors' when copied in place, the files' after a full
        save (`in_place` says which)."""
        tensors = distinct(state_dict)
        self.in_place = self.fits(tensors)
        if not self.in_place:
            self.full_save(model, state_dict)
            return sum(path.stat().st_size for path in self.maps)
        return self.write_part(tensors)

    def write_part(self, tensors: dict[str, torch.Tensor]) -> int:
        """Copy each tensor whose bytes differ over its old bytes (names, dtypes and shapes as
        laid out); returns the bytes copied."""
        written = 0
        for name, tensor in tensors.items():
            path, _, _, start, end = self.layout[name]
            dst = torch.frombuffer(self.maps[path], dtype=torch.uint8, count=end - start, offset=start)
            src = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
            if not same_bytes(dst, src):
                dst.copy_(src)
                written += end - start
        return written

    def fits(self, state_dict: dict[str, torch.Tensor]) -> bool:
        return bool(self.layout) and state_dict.keys() == self.layout.keys() and all(
            (t.dtype, tuple(t.shape)) == self.layout[n][1:3] for n, t in state_dict.items())

    def full_save(self, model, state_dict: dict[str, torch.Tensor]) -> None:
        self.close()
        model.save_pretrained(self.out, state_dict=state_dict, safe_serialization=True)
        self.map_files()

    def allocate(self, config, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
        """`out` as an HF checkpoint (config.json + one model.safetensors) holding `tensors`
        (name -> dtype, shape), zero until `write_part` fills them."""
        self.close()
        self.out.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(self.out)
        header, offset = {}, 0
        for name, (dtype, shape) in tensors.items():
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps({**header, "__metadata__": {"format": "pt"}}).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        with open(self.out / "model.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            f.truncate(8 + len(blob) + offset)
        self.map_files()

    def map_files(self) -> None:
        self.layout = {name: (path, *slot) for path in sorted(self.out.glob("*.safetensors"))
                       for name, slot in tensor_slots(path).items()}
        for path in {entry[0] for entry in self.layout.values()}:
            with open(path, "r+b") as f:
                self.maps[path] = mmap.mmap(f.fileno(), 0)

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps, self.layout = {}, {}


def write_sharded(mirror: Optional[SafetensorsMirror], config, state_dict: dict[str, torch.Tensor],
                  bucket_bytes: int = distributed.GATHER_BUCKET_BYTES) -> int:
    """A model sharded over trainer processes into rank 0's `mirror` (None on the other ranks),
    one gathered bucket at a time: every rank calls it, since each bucket's gather is a collective.
    The file is laid out from the global shapes on the first call (and if they ever change).
    Returns the bytes written (0 on the other ranks)."""
    if mirror is not None:
        mirror.in_place = mirror.fits(state_dict)
        if not mirror.in_place:
            mirror.allocate(config, {name: (t.dtype, tuple(t.shape)) for name, t in state_dict.items()})
    return distributed.gather_to_main(distributed.buckets(state_dict, bucket_bytes),
                                      mirror.write_part if mirror is not None else None)


def save_gathered(out: Optional[Path], config, state_dict: dict[str, torch.Tensor]) -> None:
    """A sharded model saved once into `out` (rank 0; None on the others, which gather along) as
    an HF checkpoint: config.json + one model.safetensors."""
    mirror = SafetensorsMirror(out) if out is not None else None
    write_sharded(mirror, config, state_dict)
    if mirror is not None:
        mirror.close()
