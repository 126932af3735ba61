"""Asynchronous GRPO (`train.max_staleness=k > 0`): a producer thread generates and scores the
rollouts of the next k steps while the trainer trains, each tagged with the policy version that
generated it (the step whose weights vLLM served; 0 = the initial weights).

The schedule is fixed, so a seeded run repeats itself: step s's rollout is generated on version
`max(0, s-1-k)` (rounded down to the last sync step with `sync.sync_every`; a run resumed between
syncs serves the checkpoint's weights until the next one, and says so: resume then repeats the
uninterrupted run only from a checkpoint at a sync step). The producer waits
until that version is served; the sync installing version v first waits until every rollout due
on an older version (steps <= v + k) is generated, so the weights never change during a request.
The producer may use version v once the trainer asks for step v+1's rollout, i.e. after step v's
eval and checkpoint: so no rollout request runs beside an eval, and at a checkpoint the producer
is idle and the finished rollouts it holds are exactly the run's in-flight state.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Optional, Protocol

class Rollouts(Protocol):
    """Where train_step gets each step's rollout: produced on the spot (k = 0) or by the producer."""

    def take(self, step: int) -> tuple[object, dict]:
        """Step `step`'s scored rollout and its metrics (phase seconds, staleness)."""

    def before_sync(self, version: int) -> None:
        """Return once the weights may change (no request is due on older ones)."""

    def update(self, step: int) -> ContextManager[None]:
        """Around the trainer's optimizer step."""

    def state_dict(self) -> dict:
        """Rollouts generated ahead and not yet trained on (saved in checkpoints)."""

    def load_state_dict(self, state: dict) -> None:
        """Before `start`: the rollouts a checkpoint holds are taken, not generated again."""

    def start(self) -> None:
        """Begin producing (after every part of the run is restored)."""

    def busy(self, start: float, end: float) -> float:
        """Seconds of [start, end] (perf_counter) in which rollouts were being generated or scored
        beside the trainer: the overlap async buys."""

    def stop(self) -> None: ...


class InlineRollouts:
    """k = 0, the synchronous loop: a step's rollout is generated and scored when the trainer asks."""

    def __init__(self, produce: Callable[[int], tuple]):
        self.produce = produce

    def take(self, step: int) -> tuple[object, dict]:
        start = time.perf_counter()
        rollout, seconds = self.produce(step)
        return rollout, {**seconds, "time_wait_rollout": time.perf_counter() - start}

    def before_sync(self, version: int) -> None:
        pass

    def update(self, step: int) -> ContextManager[None]:
        return nullcontext()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def start(self) -> None:
        pass

    def busy(self, start: float, end: float) -> float:
        return 0.0  # generated while the trainer waits, never beside it

    def stop(self) -> None:
        pass


@dataclass(frozen=True)
class Schedule:
    """Which policy version generates each step's rollout, and what a sync must wait for."""

    max_staleness: int
    sync_every: int = 1
    start: int = 0  # a resumed run's step: vLLM serves its weights until the next sync

    def version_for(self, step: int) -> int:
        """The version (a sync step, 0, or the resumed step) whose weights generate step `step`'s
        rollout. A run resumed between syncs pushed the checkpoint's weights, newer than the
        last sync's: those generate until the next sync."""
        version = max(0, step - 1 - self.max_staleness)
        return max(version - version % self.sync_every, self.start)

    def last_before(self, version: int) -> int:
        """The last step whose rollout is generated on a version older than `version` (a sync
        step): installing `version` waits until it is generated."""
        return version + self.max_staleness


@dataclass
class Produced:
    """A generated, scored rollout with its bookkeeping."""

    rollout: object  # grpo.batch.Rollout
    version: int  # the policy version (step) whose weights vLLM served while generating it
    seconds: dict  # time_generate, time_score, time_wait_weights of the producer


class WeightVersions:
    """Which weights the trainer holds, and the lock held while they change: a vLLM restart's
    re-sync (serving/guard.py) pushes only whole weights and records the version it pushed. Built
    before the guard and the producer, which both use it."""

    def __init__(self, start: int = 0):
        self.trainer = start  # the step the trainer's weights are
        self.resynced = -1  # the version a vLLM restart pushed (the trainer's weights then)
        self.updating = threading.Lock()  # held while the trainer changes its weights

    @contextmanager
    def update(self, step: int) -> Iterator[None]:
        with self.updating:
            yield
            self.trainer = step

    def resync(self, push: Callable[[int], object]) -> Callable[[int], object]:
        """`push` (the guard's re-sync after a vLLM restart) run between optimizer steps, recording
        the version vLLM then serves: a restart's regenerated rollout is tagged with it."""

        def locked(step: int):  # the caller's step; the weights pushed are the trainer's version
            with self.updating:
                out = push(self.trainer)
                self.resynced = self.trainer
                return out

        return locked


class RolloutPipeline:
    """The producer thread and its version-tagged buffer. `produce(step) -> (rollout, seconds)`
    is the synchronous loop's generate + score of that step (seeded by the step)."""

    def __init__(self, produce: Callable[[int], tuple], schedule: Schedule, steps: int, versions: WeightVersions):
        self.produce, self.schedule, self.steps, self.versions = produce, schedule, steps, versions
        self.published = -1  # the newest step the trainer is done with (none yet: the producer waits)
        self.ready: dict[int, Produced] = {}  # step -> finished rollout, not yet taken
        self.next_step = schedule.start + 1  # the next step to generate
        self.idle = False  # the producer waits for a version (nothing in flight)
        self.spans: list[tuple[float, float]] = []  # (start, end) of each produce, the last maybe open
        self.error: Optional[BaseException] = None
        self.stopping = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name="rollout-producer", daemon=True)

    def load_state_dict(self, state: dict[int, Produced]) -> None:
        self.ready = dict(state)
        self.next_step = max(self.ready, default=self.schedule.start) + 1

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        try:
            while self.next_step <= self.steps:
                step, start = self.next_step, time.perf_counter()
                with self.cond:
                    self.idle = True
                    self.cond.notify_all()
                    self.cond.wait_for(lambda: self.stopping or self.published >= self.schedule.version_for(step))
                    self.idle = False
                    if self.stopping:
                        return
                began = time.perf_counter()
                waited = began - start
                with self.cond:
                    self.spans.append((began, float("inf")))
                rollout, seconds = self.produce(step)
                with self.cond:
                    self.spans[-1] = (began, time.perf_counter())
                    version = max(self.schedule.version_for(step), self.versions.resynced)  # a restart pushed newer
                    self.ready[step] = Produced(rollout, version,
                                                {**seconds, "time_wait_weights": waited})
                    self.next_step = step + 1
                    self.cond.notify_all()
        except BaseException as exc:  # reaches the trainer at its next take/sync
            with self.cond:
                self.error = exc
                self.cond.notify_all()
        finally:
            with self.cond:
                self.idle = True
                self.cond.notify_all()

    def _wait(self, ready: Callable[[], bool]) -> None:
        with self.cond:
            self.cond.wait_for(lambda: ready() or self.error is not None)
            if self.error is not None and not ready():
                raise RuntimeError("the rollout producer failed") from self.error

    def take(self, step: int) -> tuple[object, dict]:
        """Step `step`'s rollout (waiting for it) and its metrics: staleness (versions behind
        the weights it trains), the producer's phase times, and the trainer's wait."""
        start = time.perf_counter()
        self.publish(step - 1)  # asking for `step`, the trainer is done with the one before
        self._wait(lambda: step in self.ready)
        with self.cond:
            item = self.ready.pop(step)
        return item.rollout, {**item.seconds, "time_wait_rollout": time.perf_counter() - start,
                              "staleness": step - 1 - item.version, "policy_version": item.version}

    def before_sync(self, version: int) -> None:
        """Block until no request due on an older version is left (weights never change during one)."""
        last = min(self.schedule.last_before(version), self.steps)
        self._wait(lambda: self.next_step > last)

    def update(self, step: int) -> ContextManager[None]:
        """Around the trainer's optimizer step: a vLLM restart in the producer re-syncs only whole weights."""
        return self.versions.update(step)

    def publish(self, step: int) -> None:
        """The trainer is done with `step` (its sync, eval and checkpoint): the producer may
        generate the rollouts due on its weights (or, between syncs, on the last synced ones)."""
        with self.cond:
            self.published = max(self.published, step)
            self.cond.notify_all()

    def busy(self, start: float, end: float) -> float:
        with self.cond:
            self.spans = [s for s in self.spans if s[1] > start]  # the trainer asks in time order
            return sum(max(0.0, min(e, end) - max(b, start)) for b, e in self.spans)

    def state_dict(self) -> dict[int, Produced]:
        """The finished rollouts not yet trained on, once the producer is idle (for a checkpoint)."""
        self._wait(lambda: self.idle)
        with self.cond:
            return dict(self.ready)

    def stop(self) -> None:
        """Stop the producer; a request it is inside finishes (or fails) on its own: it is a daemon."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout=5.0)
