"""Disjoint CPU cores for the trainer and vLLM (`hardware.trainer_cpus`, `hardware.vllm_cpus`).

On one CPU machine the two compete for the same cores; with async GRPO (`train.max_staleness`)
they run at once by design. Pinning each to its own cores makes their overlap measurable and
keeps one from slowing the other's phase. vLLM's side is set where it starts (serving/lifeline.py
pins the server's process group, `VLLM_CPU_OMP_THREADS_BIND` its compute threads), so a restart
after a crash lands on the same cores whatever the trainer's own affinity is.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, Sequence

import torch

# The cores this process could run on when it started: what `hardware.*_cpus` may name, and what
# a pinned run gives back when it ends (a Hydra multirun runs its jobs in one process).
MACHINE_CPUS = frozenset(os.sched_getaffinity(0))


def _pin(cpus: Iterable[int], threads: int) -> None:
    """Every thread of this process (OpenMP's, started before, too) on `cpus`; `threads` torch threads."""
    for tid in map(int, os.listdir("/proc/self/task")):
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            pass  # ended meanwhile
    torch.set_num_threads(threads)


@contextmanager
def pinned_trainer(cpus: Optional[Sequence[int]], threads: Optional[int]) -> Iterator[None]:
    """Inside: this process on `cpus` (None: where it was) with `threads` torch threads (None: one
    per pinned core, else as it was); on leaving, its cores and thread count as they were."""
    before = (os.sched_getaffinity(0), torch.get_num_threads())
    _pin(cpus or before[0], threads or (len(cpus) if cpus else before[1]))
    try:
        yield
    finally:
        _pin(*before)
