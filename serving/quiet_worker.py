"""vLLM's worker stops burning a core while it waits for the next request.

Each vLLM worker reads its requests from a shared-memory queue (`shm_broadcast.MessageQueue`).
After every read it spins on the queue's flag with `sched_yield()` for `busy_loop_s` = 1 s
(`SpinCondition.wait`), so one core runs at 100 % for a second after every request: on a
machine where the trainer shares the cores (CPU, or a GPU node's host threads) whatever the
trainer does right after generation, the step's whole train phase, runs on a contended machine.

Spinning is what keeps decoding fast: between two decode steps of one request the next message
arrives within about a millisecond. So the worker still spins for `GRPO_VLLM_SPIN_MS` (default
20 ms) after a read; past that it polls the same flag with `GRPO_VLLM_NAP_MS` (5 ms) naps until
vLLM's own idle timeout, then parks on vLLM's notify socket as before. Nothing else changes: the
flag vLLM's writer sets is the one read, and the notify path is vLLM's. `GRPO_VLLM_QUIET=0`
turns it off (the A/B switch of experiments/step_time.py).

`install()` runs in each worker process when our worker extension module is imported, before
vLLM creates its queues; it patches the class, so every queue of the process naps.
"""

from __future__ import annotations

import os
import time

from vllm.distributed.device_communicators import shm_broadcast

SPIN_S = float(os.environ.get("GRPO_VLLM_SPIN_MS", "20")) / 1e3
NAP_S = float(os.environ.get("GRPO_VLLM_NAP_MS", "5")) / 1e3

_vllm_wait = shm_broadcast.SpinCondition.wait


def quiet_wait(self: shm_broadcast.SpinCondition, timeout_ms: int | None = None) -> None:
    """`SpinCondition.wait` that naps instead of spinning once the last read is SPIN_S old."""
    since_read = time.monotonic() - self.last_read
    if SPIN_S < since_read <= self.busy_loop_s:
        time.sleep(NAP_S)
        return
    _vllm_wait(self, timeout_ms)


def install() -> bool:
    """Patch vLLM's reader wait in this process (unless GRPO_VLLM_QUIET=0); True if patched."""
    if os.environ.get("GRPO_VLLM_QUIET", "1") == "0":
        return False
    shm_broadcast.SpinCondition.wait = quiet_wait
    return True
