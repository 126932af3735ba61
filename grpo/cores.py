"""Disjoint CPU cores for the trainer and vLLM (`hardware.trainer_cpus`, `hardware.vllm_cpus`).

On one CPU machine the two compete for the same cores; with async GRPO (`train.max_staleness`)
they run at once by design. Pinning each to its own cores makes their overlap measurable and
keeps one from slowing the other's phase. vLLM's side is set where it starts (serving/lifeline.py
pins the server's process group, `VLLM_CPU_OMP_THREADS_BIND` its compute threads), so a restart
after a crash lands on the same cores whatever the trainer's own affinity is.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch


def pin_trainer(cpus: Optional[Sequence[int]], threads: Optional[int]) -> None:
    """Run every thread of this process on `cpus` (None: leave them), with `threads` torch threads
    (None: one per pinned core, else torch's default)."""
    if cpus:
        for tid in map(int, os.listdir("/proc/self/task")):  # threads started before (OpenMP's) too
            try:
                os.sched_setaffinity(tid, cpus)
            except ProcessLookupError:
                pass  # ended meanwhile
    threads = threads or (len(cpus) if cpus else None)
    if threads:
        torch.set_num_threads(threads)

