"""Which CPU this is, in the words results tables use: its model name and the widest vector ISA
that decides its precision (grpo/precision.py: bf16 is native with AVX512-BF16 or AMX, so
`hardware=cpu` runs mixed precision there and fp32 on AVX2-only CPUs)."""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# /proc/cpuinfo flags that make bf16 native, and their names in tables.
BF16_FLAGS = (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX"))
# Without those, the widest vector ISA present names the CPU kind.
VECTOR_FLAGS = (("avx512f", "AVX512"), ("avx2", "AVX2"))


def _cpuinfo() -> str:
    return CPUINFO.read_text() if CPUINFO.exists() else ""


def cpu_model() -> str:
    """`model name` of the first CPU ("?" where /proc/cpuinfo does not say)."""
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")),
                "?")


def cpu_isa() -> str:
    """The native-bf16 extensions the CPU flags ("AVX512-BF16+AMX"), else its widest vector ISA
    ("AVX512", "AVX2"), else "other"."""
    flags = next((set(line.split(":", 1)[1].split()) for line in _cpuinfo().splitlines()
                  if line.startswith("flags")), set())
    bf16 = [name for flag, name in BF16_FLAGS if flag in flags]
    return "+".join(bf16) if bf16 else next((name for flag, name in VECTOR_FLAGS if flag in flags), "other")


def cpu_kind() -> str:
    """e.g. `Intel(R) Xeon(R) Processor (AVX512-BF16+AMX)`: a results row's machine."""
    return f"{cpu_model()} ({cpu_isa()})"
