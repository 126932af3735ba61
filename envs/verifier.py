"""math-verify scoring in a process pool, every item bounded in time.

sympy can hang or explode on adversarial completions (huge LaTeX, deep nesting). Each item runs
under a CPU-time timer in a worker process (math-verify's own wall-clock alarms use ITIMER_REAL,
so ours uses ITIMER_PROF and neither cancels the other); an item that still does not return in
time (stuck in C code) scores 0 and its pool is killed and rebuilt, so one bad completion never
stalls the run.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import signal
from concurrent.futures import ProcessPoolExecutor, wait
from typing import Optional


class _ItemTimeout(Exception):
    pass


def _on_timer(signum, frame):
    raise _ItemTimeout()


def score_one(completion: str, gold: str, timeout_s: float) -> float:
    """1.0 if math-verify finds the gold answer in the completion, else 0.0 (errors, timeouts)."""
    from math_verify import parse, verify

    signal.signal(signal.SIGPROF, _on_timer)
    signal.setitimer(signal.ITIMER_PROF, timeout_s)
    try:
        return float(verify(parse(f"${gold}$"), parse(completion)))
    except BaseException:  # noqa: BLE001 - any failure, the timeout included, scores 0
        return 0.0
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)


class MathVerifier:
    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0):
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self._pool: Optional[ProcessPoolExecutor] = None
        self.timeouts = 0  # items that outlived even the pool deadline

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: the trainer process holds torch threads that must not be forked.
            self._pool = ProcessPoolExecutor(self.num_workers, mp_context=mp.get_context("spawn"))
        return self._pool

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Score (completion, gold) pairs in parallel; same order as given."""
        if not pairs:
            return []
        futures = [self._get_pool().submit(score_one, c, g, self.timeout_s) for c, g in pairs]
        # Items time out on their own; this deadline only catches workers stuck outside Python.
        rounds = math.ceil(len(pairs) / self.num_workers)
        done, pending = wait(futures, timeout=30.0 + 2 * self.timeout_s * rounds)
        broken = [f for f in done if f.exception() is not None]  # a worker died (e.g. OOM-killed)
        if pending or broken:
            self.timeouts += len(pending)
            self._kill_pool()
        return [f.result() if f in done and f not in broken else 0.0 for f in futures]

    def _kill_pool(self) -> None:
        if self._pool is None:
            return
        for proc in list(getattr(self._pool, "_processes", {}).values()):
            proc.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
