"""vLLM's worker naps instead of spinning a core for 1 s after each request (serving/quiet_worker.py):
the trainer's phases right after generation get the machine."""

from __future__ import annotations

import time

import pytest

from experiments.quiet import CpuMeter, server_pids
from serving.client import VLLMClient


@pytest.mark.slow
def test_server_uses_no_core_in_the_second_after_a_request(vllm_server):
    client = VLLMClient(vllm_server, "policy", max_tokens=16)
    pids = server_pids(vllm_server)
    assert pids, "the session server's processes must be visible to measure them"
    loads = []
    for _ in range(3):
        client.generate([[1, 2, 3, 4]] * 4, n=4)
        time.sleep(0.05)  # past the 20 ms spin that keeps decoding fast
        with CpuMeter(tuple(pids)) as meter:
            time.sleep(0.9)  # inside vLLM's 1 s busy-loop window
        loads.append(meter.busy)
    print(f"server cores used in the second after a request: {[round(x, 3) for x in loads]}")
    # Unpatched, vLLM's worker spins here at ~1 core (0.9-1.0 measured); napping leaves ~0.05.
    assert max(loads) < 0.25
