"""`/proc/<pid>/stat` of a process, read one way: the fields after its name, which may hold
spaces and parentheses (the kernel closes it with the last `)`). serving/lifeline.py keeps its own
reader: it runs by path with only the standard library."""

from __future__ import annotations

from typing import Optional

# Indices into `stat_fields` (proc(5)'s field number minus 3).
STATE, PPID, PGRP, UTIME, STIME, STARTTIME = 0, 1, 2, 11, 12, 19


def stat_fields(pid: int | str) -> Optional[list[str]]:
    """The fields of `/proc/<pid>/stat` from the state on, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except (OSError, ProcessLookupError):
        return None
