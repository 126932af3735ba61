"""math-verify scoring in a process pool, every item bounded in wall time.

sympy can hang or explode on adversarial completions (huge exponents, deep nesting). Two limits
keep one bad completion from stalling the run:
- soft: the worker interrupts its own item after half the budget of CPU time (ITIMER_PROF, so it
  does not cancel math-verify's own SIGALRM timers); this catches slow Python code and keeps the pool;
- hard: the parent gives each item `timeout_s` of wall time from submission; an item past it (stuck
  in C code that ignores signals) scores 0, the pool's processes are killed, the other in-flight
  items are resubmitted, and a fresh pool is started on demand.
At most `num_workers` items are in flight, so an item's clock starts when a worker is free to run it,
and a fresh pool is warmed up before any item is timed: worker start-up never counts as item time.
"""

from __future__ import annotations

import functools
import inspect
import logging
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Optional

STARTUP_TIMEOUT_S = 180.0  # spawn re-imports the parent's __main__ (train.py pulls in torch): slow, once per pool


class _ItemTimeout(Exception):
    pass


def _on_cpu_timer(signum, frame):
    raise _ItemTimeout()


def _init_worker() -> None:
    """Import math-verify once per worker and quieten it: a library version mismatch logs per call."""
    import math_verify  # noqa: F401

    logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)
    signal.signal(signal.SIGPROF, _on_cpu_timer)
    verify_one("\\boxed{1}", "1", STARTUP_TIMEOUT_S)  # first parse loads lazy parts: not on a timed item


def _worker_pid() -> int:
    time.sleep(0.05)  # keeps one ready worker from answering every ping while the others still start
    return os.getpid()


@functools.cache
def _timeout_kwargs(limit_s: int) -> tuple[dict, dict]:
    """(parse, verify) kwargs for math-verify's own timeouts: newer releases take them, 0.3.x does not."""
    from math_verify import parse, verify

    def accepted(fn, **kwargs) -> dict:
        return {k: v for k, v in kwargs.items() if k in inspect.signature(fn).parameters}

    return accepted(parse, parsing_timeout=limit_s), accepted(verify, timeout_seconds=limit_s)


def verify_one(completion: str, gold: str, cpu_budget_s: float) -> float:
    """1.0 if math-verify finds `gold` (a plain answer such as "72" or "1,000") in the completion.

    Runs in a pool worker (main thread, so signal timers work). Any failure, the CPU budget
    running out included, scores 0.0. The gold is wrapped as inline LaTeX so it parses as a number.
    """
    from math_verify import parse, verify

    parse_kw, verify_kw = _timeout_kwargs(max(1, int(cpu_budget_s)))
    signal.setitimer(signal.ITIMER_PROF, cpu_budget_s)
    try:
        return float(verify(parse(f"${gold}$", **parse_kw), parse(completion, **parse_kw), **verify_kw))
    except BaseException:  # noqa: BLE001 - sympy raises anything, _ItemTimeout included
        return 0.0
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.alarm(0)  # a math-verify alarm whose cleanup our timer cut short must not hit the next item


class MathVerifier:
    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0):
        if num_workers < 1 or timeout_s <= 0:
            raise ValueError(f"need num_workers >= 1 and timeout_s > 0, got {num_workers}, {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self._pool: Optional[ProcessPoolExecutor] = None
        self.hard_timeouts = 0  # items that hit the wall-clock limit (each one cost a pool restart)
        self.startup_s: list[float] = []  # seconds each pool took to get all workers ready

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Score (completion, gold) pairs in parallel; results in the order given."""
        scores = [0.0] * len(pairs)
        queue = deque(range(len(pairs)))
        running: dict[Future, tuple[int, float]] = {}  # future -> (item index, submitted at)
        while queue or running:
            try:
                pool = self._get_pool()
                while queue and len(running) < self.num_workers:
                    future = pool.submit(verify_one, *pairs[queue[0]], self.timeout_s / 2)
                    running[future] = (queue.popleft(), time.monotonic())
            except BrokenProcessPool:  # a worker died while the pool sat idle
                self._restart(queue, running)
                continue
            first_deadline = min(t0 for _, t0 in running.values()) + self.timeout_s
            done, _ = wait(running, timeout=max(0.0, first_deadline - time.monotonic()), return_when=FIRST_COMPLETED)
            broken = False
            for f in done:
                i, _ = running.pop(f)
                exc = f.exception()
                if exc is None:
                    scores[i] = f.result()
                elif isinstance(exc, BrokenProcessPool):  # a worker died mid-item (OOM kill, segfault)
                    broken = True
            now = time.monotonic()
            expired = [f for f, (_, t0) in running.items() if now - t0 >= self.timeout_s]
            for f in expired:
                running.pop(f)
            self.hard_timeouts += len(expired)
            if expired or broken:
                self._restart(queue, running)
        return scores

    def _restart(self, queue: deque, running: dict) -> None:
        """Kill the pool; the items still in flight were innocent and go back to the queue."""
        queue.extendleft(i for i, _ in running.values())
        running.clear()
        self._kill_pool()

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            t0 = time.monotonic()
            # spawn: the trainer process holds torch threads, which must not be forked.
            pool = ProcessPoolExecutor(self.num_workers, mp_context=mp.get_context("spawn"), initializer=_init_worker)
            self._pool = pool
            ready: set[int] = set()
            try:
                while len(ready) < self.num_workers:
                    pings = [pool.submit(_worker_pid) for _ in range(self.num_workers)]
                    left = STARTUP_TIMEOUT_S - (time.monotonic() - t0)
                    ready.update(f.result(timeout=max(left, 0.1)) for f in pings)
            except Exception as exc:
                self._kill_pool()
                raise RuntimeError(f"math-verify workers failed to start within {STARTUP_TIMEOUT_S:.0f}s: {exc!r}") from exc
            self.startup_s.append(time.monotonic() - t0)
        return self._pool

    def _kill_pool(self) -> None:
        """Kill the workers outright: shutdown() would wait for the hung item to finish."""
        if self._pool is None:
            return
        procs = list((self._pool._processes or {}).values())  # no public API for this before Python 3.14
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
