"""CPU accounting from /proc on real processes: a spinning child reads as ~1 core, `wait_quiet`
waits until it stops, gives up on one that never does, and a local server is found by its port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from experiments.quiet import CpuMeter, NotQuietError, listening_pids, tree_ticks, wait_quiet


def spinner(seconds: float) -> subprocess.Popen:
    """A child that busy-loops for `seconds` inside a grandchild, then sleeps (like vLLM's worker)."""
    code = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            f"'import time\\nt = time.time()\\nwhile time.time() - t < {seconds}: pass\\ntime.sleep(60)']); "
            f"time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.3)  # the grandchild is running
    return proc


@pytest.fixture
def spinning():
    procs = []
    yield lambda seconds: procs.append(spinner(seconds)) or procs[-1]
    for proc in procs:
        for pid in _descendants(proc.pid):
            subprocess.run(["kill", "-9", str(pid)], check=False)
        proc.kill()
        proc.wait()


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out] + [d for p in out for d in _descendants(int(p))]


def test_a_spinning_grandchild_reads_as_one_core(spinning):
    proc = spinning(3.0)
    with CpuMeter((proc.pid,)) as cpu:
        time.sleep(0.5)
    # ~1.0 on an idle machine; on this shared 2-core one a loaded scheduler gives it less.
    assert 0.1 < cpu.busy < 1.2, cpu.busy
    assert tree_ticks([proc.pid]) > 0


def test_wait_quiet_waits_out_the_spin_then_reads_zero(spinning):
    proc = spinning(1.5)
    waited = wait_quiet([proc.pid], threshold=0.05, window_s=0.2, timeout_s=20)
    assert waited > 0.6  # the spin had ~1.2 s left
    with CpuMeter((proc.pid,)) as cpu:
        time.sleep(0.3)
    assert cpu.busy < 0.05


def test_wait_quiet_refuses_a_process_that_never_idles(spinning):
    proc = spinning(30.0)
    with pytest.raises(NotQuietError, match=str(proc.pid)):
        wait_quiet([proc.pid], window_s=0.2, timeout_s=1.0)


def test_gone_processes_are_quiet():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert wait_quiet([proc.pid], window_s=0.1, timeout_s=1.0) < 0.5


def test_a_local_listener_is_found_by_its_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); "
            f"print('up', flush=True); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        assert listening_pids(port) == [proc.pid]
    finally:
        proc.kill()
        proc.wait()
