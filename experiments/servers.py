"""vLLM servers kept alive across the jobs of one sweep, keyed by everything that shapes them.

Hydra's basic launcher runs a sweep's jobs one after another in one process, and the last
sweep key varies fastest: jobs that differ only in workload (group size, max tokens) then reuse
one server instead of paying a start each (tens of seconds on CPU, minutes on GPU).
"""

from __future__ import annotations

import atexit
from serving.server import VLLMServer

_live: dict[tuple, VLLMServer] = {}


def shared_server(server: VLLMServer) -> tuple[VLLMServer, bool]:
    """A healthy server equal to `server` (started now, or reused): (server, reused)."""
    key = (server.model, tuple(server.args), tuple(sorted(server.env.items())), server.external, server.base_url)
    live = _live.get(key)
    if live is not None and live.alive():
        return live, True
    stop_all()
    _live[key] = server
    try:
        server.start()
    except BaseException:
        del _live[key]
        raise
    return server, False


def stop_all() -> None:
    for server in _live.values():
        server.stop()
    _live.clear()


atexit.register(stop_all)
