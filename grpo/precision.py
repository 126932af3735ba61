"""Which dtype each side of a run works in, and how closely their numbers can agree.

Three dtypes describe a run (`Precision`):
- `master`: the trainer's parameters and optimizer state (`model.master_dtype`; `auto`: fp32, or
  the served dtype where the bridge trains vLLM's own tensors, sync=shared);
- `compute`: the trainer's forward/backward: `model.dtype` when it is narrower than the master
  weights (bf16 autocast over fp32 masters: the mixed precision of every GPU recipe), else
  `hardware.autocast` (bf16 compute against an fp32 server, where bf16 is native), else `master`;
- `served`: what vLLM holds and computes in (`model.dtype`, its `--dtype`; `auto`: bf16 where it is
  native on the device, CUDA or a CPU with AVX512-BF16/AMX, else fp32).

Every comparison of trainer and vLLM numbers takes its tolerance from here, by the coarsest dtype
the two sides' logits pass through (`logprob_tolerance`): the bridges' probe, the tests, the
benchmarks. Comparisons of two runs of the trainer (one process vs two) use `run_rtol`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# max |dlogprob| between two computations of the same weights, by the coarsest dtype on the way.
# float32: measured 2-4e-7 between HF on the trainer and vLLM (CPU); 1e-3 leaves room for other
# kernels and still sits far below what one optimizer step moves (> 1e-2).
# bfloat16 keeps 8 significant bits: a logit of magnitude 8-16 moves in steps of 0.0625, 16-32 in
# steps of 0.125, 32-64 in steps of 0.25, and the trainer's and vLLM's kernels round differently in
# every layer, so a correct sync shows a gap of about one such step at the probe's sharpest token
# (measured 0.016-0.078 over the 40 reload syncs of `python train.py model.dtype=bfloat16`, tiny
# model on CPU; 0.154 at ~85M and 0.166 on the SFT-sharpened arith model, AVX512-BF16: it grows as
# the policy sharpens). 0.3 clears a step at |logit| < 64, while a wrong or stale model is off by
# whole nats (another run's weights: 0.74). float16 keeps 3 more bits: an eighth of that.
LOGPROB_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.3, torch.float16: 0.04}

# Relative agreement of two trainer runs that do the same maths in another order (one process vs
# FSDP over two, which reduces gradients in another order and splits the rows of each matmul).
# float32: measured ~1e-7 on grad norms. bfloat16 autocast (AVX512-BF16 CPU): 1.3e-5 at step 1,
# 1.9e-3 at step 2, once the two runs' weights differ by their first update's rounding: so one
# bf16 rounding step (2^-7), which still catches a wrong normaliser or a lost shard (those are
# off by tens of percent). float16 keeps 3 more bits.
RUN_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def torch_dtype(name: str, key: str = "model.dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{key}={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def coarsest(*dtypes: torch.dtype) -> torch.dtype:
    """The floating dtype with the fewest significant bits among `dtypes`."""
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def logprob_tolerance(*dtypes: torch.dtype) -> float:
    """max |dlogprob| two computations agree to when their logits pass through `dtypes`."""
    return LOGPROB_TOLERANCE[coarsest(*dtypes)]


def run_rtol(*dtypes: torch.dtype) -> float:
    """Relative tolerance between two trainer runs computing in `dtypes`."""
    return RUN_RTOL[coarsest(*dtypes)]


def cpu_bf16_native() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run in hardware (elsewhere torch emulates them)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def bf16_native(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_bf16_native()


def served_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """`model.dtype` -> what vLLM serves: "auto" is bf16 where bf16 is native on `device`
    (generation and training both run faster there; fp32 master weights keep updates), else fp32."""
    if name == "auto":
        return torch.bfloat16 if bf16_native(device) else torch.float32
    return torch_dtype(name)


def autocast_dtype(setting: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """`hardware.autocast` -> the dtype forward/backward autocast to (fp32 master weights), or None.

    "auto" picks bf16 only where bf16 matmuls are native: CUDA devices that support it, CPUs with
    AVX512-BF16 or AMX. Elsewhere (e.g. AVX2-only CPUs) torch emulates them, measured 2.4x slower
    than fp32 for a 0.46M-param step on an AVX2 machine."""
    if setting is None:
        return None
    if setting != "auto":
        return torch_dtype(setting, key="hardware.autocast")
    return torch.bfloat16 if bf16_native(device) else None


@dataclass(frozen=True)
class Precision:
    master: torch.dtype = torch.float32
    compute: torch.dtype = torch.float32
    served: torch.dtype = torch.float32

    @classmethod
    def resolve(cls, dtype: str, master_dtype: str = "float32", autocast: Optional[str] = None,
                device: torch.device | str = "cpu", shared_by: Optional[str] = None) -> "Precision":
        """From `model.dtype`, `model.master_dtype` and `hardware.autocast` on `device`;
        `shared_by`: the sync whose bridge trains vLLM's own tensors (their dtype is the masters')."""
        served = served_dtype(dtype, device)
        if master_dtype == "auto":
            master = served if shared_by else torch.float32
        else:
            master = torch_dtype(master_dtype, key="model.master_dtype")
        if torch.finfo(served).eps < torch.finfo(master).eps:
            raise ValueError(f"model.master_dtype={master_dtype} is narrower than model.dtype={dtype}: the master "
                             "weights must hold at least what vLLM serves")
        if shared_by and master != served:
            raise ValueError(f"sync={shared_by} trains vLLM's own {dtype_name(served)} tensors, so there is no "
                             f"{dtype_name(master)} master copy to keep: set model.master_dtype={dtype_name(served)} "
                             "or auto (pure low precision), model.dtype=float32, or use another sync")
        compute = served if served != master else (autocast_dtype(autocast, torch.device(device)) or master)
        return cls(master, compute, served)

    @property
    def autocast(self) -> Optional[torch.dtype]:
        """What forward/backward autocast to, or None where they run at the master weights' dtype."""
        return self.compute if self.compute != self.master else None

    @property
    def mixed(self) -> bool:
        """vLLM serves a cast of the trainer's master weights, not the weights themselves."""
        return self.served != self.master

    def compute_context(self, device: torch.device):
        """Where training-time forwards run."""
        return torch.autocast(device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()

    def served_context(self, device: torch.device):
        """Where the probe computes: at the precision vLLM serves (bf16 autocast over fp32 masters
        when it serves bf16, plain master weights when it serves them as they are)."""
        return torch.autocast(device.type, dtype=self.served) if self.mixed else contextlib.nullcontext()

    @property
    def probe_tolerance(self) -> float:
        """A verified sync: vLLM's logprobs of the probe vs the trainer's at the served precision."""
        return logprob_tolerance(self.served, self.master)

    @property
    def gap_tolerance(self) -> float:
        """`logprob_gap` of a healthy step: the trainer's compute vs vLLM's served precision."""
        return logprob_tolerance(self.compute, self.served)

    @property
    def rtol(self) -> float:
        return run_rtol(self.compute, self.served)

    @classmethod
    def from_dict(cls, d: dict) -> "Precision":
        """From `to_dict()`: what a run's `precision` event (events.jsonl) recorded."""
        return cls(*(torch_dtype(d[k], key=k) for k in ("master", "compute", "served")))

    def to_dict(self) -> dict:
        return {"master": dtype_name(self.master), "compute": dtype_name(self.compute),
                "served": dtype_name(self.served), "cpu_bf16_native": cpu_bf16_native()}


def bf16_spacing(magnitude: float) -> float:
    """Distance between neighbouring bf16 numbers at |x| = magnitude (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(magnitude)) - 7)


def warn_if_update_rounds_away(model: torch.nn.Module, lr: float, master: torch.dtype) -> Optional[str]:
    """Pure low-precision master weights: AdamW moves each weight by about lr a step, and a move
    below half the spacing at the weight's magnitude rounds back to the same number. Warns (and
    returns the message) when that holds for the median |w| of the trained matrices."""
    if master == torch.float32:
        return None
    weights = [p.detach().abs().float().flatten() for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    if not weights:
        return None
    sample = torch.cat([w[torch.linspace(0, len(w) - 1, min(len(w), 4096)).long()] for w in weights])
    median = float(sample.median())
    if median <= 0:
        return None
    spacing = bf16_spacing(median) if master == torch.bfloat16 else torch.finfo(master).eps * median
    if lr >= spacing / 2:
        return None
    message = (f"optimizer.lr={lr:g} is below half the {dtype_name(master)} spacing ({spacing:.2g}) at the median "
               f"|weight| {median:.3g} of the trained matrices: most updates round away. Keep fp32 master weights "
               f"(model.master_dtype=float32, the default) or raise the learning rate.")
    warnings.warn(message, stacklevel=2)
    return message
