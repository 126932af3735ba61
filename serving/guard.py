"""Calls to a vLLM server we own survive its death or hang: restart it, re-sync the weights, call again.

A call past its deadline (`VLLMHungError`: alive, not answering) counts as a dead server: the
process group is SIGKILLed (a stopped or wedged engine never handles SIGTERM) and restarted.
An attached server (`server.base_url`) is never restarted: its failures reach the caller.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, TypeVar

from serving.server import VLLMHungError, VLLMRequestError, VLLMServer

T = TypeVar("T")


def server_died(server: VLLMServer, grace_s: float = 5.0) -> bool:
    """Whether our own server is gone; a killed process can still look alive for a moment."""
    deadline = time.monotonic() + grace_s
    while not server.external and server.alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return not server.external


class RestartGuard:
    """`call(step, fn)` runs fn (which talks to vLLM); if our server died before or during it, or
    hung (a call past its deadline), the server starts again on the base model `model`,
    `resync(step)` pushes the current weights (or LoRA adapter) through the bridge's verified sync,
    `on_restart(step, **info)` records it (`reason="hung"` with the call and its deadline's key),
    and fn runs once more. `restarts` counts them (saved in checkpoints)."""

    def __init__(self, server: VLLMServer, model: str, resync: Callable[[int], object],
                 on_restart: Optional[Callable[..., None]] = None, restarts: int = 0):
        self.server = server
        self.model = model
        self.resync = resync
        self.on_restart = on_restart
        self.restarts = restarts

    def restart(self, step: int, reason: str, **info) -> None:
        t = time.perf_counter()
        self.server.restart(model=self.model, kill=reason == "hung")
        self.resync(step)
        self.restarts += 1
        if self.on_restart:
            self.on_restart(step, reason=reason[:500], **info, restarts=self.restarts,
                            restart_s=round(time.perf_counter() - t, 1))

    def state_dict(self) -> dict:
        return {"restarts": self.restarts}

    def load_state_dict(self, state: dict) -> None:
        self.restarts = state["restarts"]

    def call(self, step: int, fn: Callable[[], T]) -> T:
        if not self.server.external and not self.server.alive():
            self.restart(step, "server process not alive")
        try:
            return fn()
        except VLLMHungError as exc:
            if self.server.external:
                raise
            self.restart(step, "hung", call=exc.call, key=exc.key, deadline_s=round(exc.seconds, 1))
        except VLLMRequestError as exc:
            if not server_died(self.server):
                raise
            self.restart(step, str(exc))
        return fn()


class Unguarded:
    """The guard of a run with several trainer processes: a dead server stops the run. Restarting
    it would re-sync from rank 0 alone, while a sharded model's sync is a collective of all ranks."""

    restarts = 0

    def state_dict(self) -> dict:
        return {"restarts": 0}

    def load_state_dict(self, state: dict) -> None:
        pass

    def call(self, step: int, fn: Callable[[], T]) -> T:
        return fn()
