"""A server we start dies with the process that started it, however that process dies.

The watchdog half runs by path, as the leader of the server's own session and process group:

    python -I serving/lifeline.py <parent pid> [--cpus 0,1] -- <server command ...>

With `--cpus` the watchdog first pins itself to those cores, so the whole server inherits them
(`hardware.vllm_cpus`, runtime/cores.py). It starts the server as its child and waits on two pidfds, the parent's and the server's. When
the parent is gone (SIGKILL included: the kernel wakes the pidfd of any process that exits) it
stops the group: SIGTERM to every member, SIGKILL to what is left after `GRACE_S`. vLLM's
engine-core and worker processes are in the group, so they go too (a signal to the API server
alone does not reach them). When the server exits by itself the rest of the group goes the same
way, and the watchdog exits with the server's code, so the parent reads the server's fate from
`Popen.poll()` of the watchdog. The watchdog sits out SIGTERM and SIGINT: `VLLMServer.stop()`
signals the whole group and waits for the watchdog, which ends once the server has.
Standard library only: it must start in a few ms, whatever the parent's interpreter imported.

The parent half is `exit_on_sigterm()`: SIGTERM (`timeout`, `scancel`, `docker stop`) becomes
SystemExit in the parent, so its ExitStack cleanup runs as it does for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator

GRACE_S = 10.0  # vLLM shuts its engine down on SIGTERM in 2-5 s on CPU
PR_SET_PDEATHSIG = 1


def group_members(pgid: int) -> list[int]:
    """Live processes (zombies excluded) of process group `pgid`, this one excluded."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, _, group = f.read().rpartition(")")[2].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(group) == pgid and state != "Z":
            members.append(int(entry))
    return members


def stop_group(grace_s: float = GRACE_S) -> None:
    """SIGTERM every other member of this process group; SIGKILL those left after `grace_s`."""
    pgid = os.getpgrp()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)  # this process sits it out
    deadline = time.monotonic() + grace_s
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in group_members(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def watch(parent: int, cmd: list[str]) -> int:
    """Run `cmd` until it exits or `parent` does; returns the exit code to leave with."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)  # a handler, not SIG_IGN: the child gets the default back
    libc = ctypes.CDLL(None, use_errno=True)
    # If the watchdog itself is killed, the server still hears of it (its own children are then
    # orphans in this group: the next stop() or the machine's reaper takes them).
    child = subprocess.Popen(cmd, preexec_fn=lambda: libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM))
    try:
        watched = [os.pidfd_open(parent)]
    except ProcessLookupError:
        watched = []  # the parent died before we looked
    server_fd = os.pidfd_open(child.pid)
    if not watched or server_fd not in select.select([server_fd, *watched], [], [])[0]:
        print(f"lifeline: parent pid {parent} is gone; stopping the server's process group",
              file=sys.stderr, flush=True)
    stop_group()
    code = child.wait()
    return 128 - code if code < 0 else code


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """Inside: the first SIGTERM raises SystemExit(143) (cleanup runs), later ones are ignored
    while it does. Outside the main thread Python cannot install handlers: no change there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def on_sigterm(signum, frame):
        if not fired:
            fired.append(signum)
            raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    split = sys.argv.index("--")
    if sys.argv[2:4][:1] == ["--cpus"]:  # the server's cores: its processes inherit them
        os.sched_setaffinity(0, [int(c) for c in sys.argv[3].split(",")])
    sys.exit(watch(int(sys.argv[1]), sys.argv[split + 1:]))
