"""A server we start dies with us however we die; an attached one is never touched.

Fast tests with real processes instead of vLLM: a "server" that forks a grandchild (like vLLM's
engine core) runs under the lifeline, its parent is killed, and every pid of its group must be gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from runtime.procfs import STATE, stat_fields
from serving.lifeline import exit_on_sigterm, group_members
from serving.server import LIFELINE, VLLMServer

# A "server": prints its pid and its child's, then sleeps; the child is in the same group.
SERVER = ("import os, subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
          "'import time; time.sleep(600)']); print(os.getpid(), c.pid, flush=True); time.sleep(600)")


def wait_gone(pgid: int, timeout_s: float) -> float:
    """Seconds until process group `pgid` has no live member (zombies do not count)."""
    t = time.monotonic()
    while group_members(pgid) and time.monotonic() - t < timeout_s:
        time.sleep(0.05)
    return time.monotonic() - t


def alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[STATE] != "Z"


# A parent that starts the lifeline and the "server" as VLLMServer would, prints the group, waits.
PARENT = f"""
import os, subprocess, sys, time
proc = subprocess.Popen([sys.executable, "-I", {str(LIFELINE)!r}, str(os.getpid()), "--", sys.executable, "-c",
                         {SERVER!r}], stdout=subprocess.PIPE, text=True, start_new_session=True)
print(proc.pid, proc.stdout.readline().strip(), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_server_group_dies_with_its_parent(sig):
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    lifeline, server, grandchild = map(int, parent.stdout.readline().split())
    assert os.getpgid(server) == os.getpgid(grandchild) == lifeline != os.getpgid(parent.pid)
    assert all(alive(p) for p in (lifeline, server, grandchild))
    parent.send_signal(sig)
    parent.wait()
    gone_s = wait_gone(lifeline, timeout_s=15)
    assert not any(alive(p) for p in (lifeline, server, grandchild)), f"still alive after {gone_s:.1f}s"
    assert gone_s < 5  # the sleeping "server" dies on the group's SIGTERM at once


def test_stop_waits_for_the_server_and_returns_its_group(tmp_path):
    """stop() signals the group; the lifeline leaves only after the server did."""
    server = VLLMServer("m", args=[], env={}, log_path=tmp_path / "log")
    server.command = lambda: [sys.executable, "-c", SERVER]
    server.wait_healthy = lambda: None
    server.start()
    deadline = time.monotonic() + 60
    while len(group_members(server.proc.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    members = group_members(server.proc.pid)
    assert len(members) == 3  # lifeline, server, its child
    server.stop()
    assert not any(alive(p) for p in members)


def test_server_that_exits_takes_its_group_along_and_reports_its_code(tmp_path):
    crash = ("import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
             "sys.exit(3)")
    server = VLLMServer("m", args=[], env={}, log_path=tmp_path / "log")
    server.command = lambda: [sys.executable, "-c", crash]
    server.wait_healthy = lambda: None
    server.start()
    assert server.proc.wait(timeout=20) == 3
    assert wait_gone(server.proc.pid, timeout_s=15) < 15


def test_sigterm_becomes_system_exit_once():
    with pytest.raises(SystemExit) as exc:
        with exit_on_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert exc.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_attached_server_is_never_touched(tmp_path):
    server = VLLMServer("m", args=[], env={}, log_path=tmp_path / "log", base_url="http://127.0.0.1:9")
    server.stop()
    assert server.proc is None
    with pytest.raises(Exception, match="cannot restart the external server"):
        server.restart()
