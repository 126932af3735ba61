"""One run at a time pushes weights into an attached vLLM server (`server.base_url`).

Two runs attached to one server (a sweep's points, a second terminal) would overwrite each
other's weights; the sync's probe then fails with a large logprob gap. A run therefore holds a
lease on the server for its whole life: an exclusive `flock` on a file named after the server's
address, which the kernel releases when the process ends, however it ends. Runs on the same
machine take turns; the lease does not reach runs on other machines.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

LEASE_DIR = Path(tempfile.gettempdir()) / "grpo-lab-leases"
_held: set[str] = set()  # this process's leases: a second one would wait on itself forever


class LeaseTimeout(TimeoutError):
    """Another run held the server for longer than `server.lease_wait_s`."""


def lease_key(base_url: str) -> str:
    """`http://localhost:8000/` and `http://127.0.0.1:8000` are one server: `127.0.0.1_8000`."""
    url = urlparse(base_url)
    host = (url.hostname or base_url).lower()
    host = "127.0.0.1" if host == "localhost" else host
    return f"{host}_{url.port or (443 if url.scheme == 'https' else 80)}"


class ServerLease:
    """Context manager: waits (at most `wait_s` seconds, None: as long as it takes) until no other
    run holds `base_url`, telling `say` who holds it, then holds it until exit."""

    def __init__(self, base_url: str, run_dir: Optional[Path], wait_s: Optional[float] = 3600.0,
                 say: Callable[[str], None] = print, poll_s: float = 0.5, directory: Path = LEASE_DIR):
        self.base_url, self.run_dir, self.wait_s, self.say, self.poll_s = base_url, run_dir, wait_s, say, poll_s
        self.key = lease_key(base_url)
        self.path = directory / f"{self.key}.lock"
        self.fd: Optional[int] = None

    def holder(self) -> str:
        """Who holds the lease, as its holder wrote it (pid, run dir)."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "another run"
        return f"pid {info.get('pid')} (run dir {info.get('run_dir')})"

    def __enter__(self) -> "ServerLease":
        if self.key in _held:
            raise RuntimeError(f"this process already holds the lease on vLLM at {self.base_url}: "
                               "a run attached to it was not closed")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        start, said = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if self.wait_s is not None and waited >= self.wait_s:
                    os.close(fd)
                    raise LeaseTimeout(f"vLLM at {self.base_url} stayed in use by {self.holder()} for "
                                       f"{waited:.0f}s > server.lease_wait_s={self.wait_s}: another run is "
                                       "pushing its weights into it; wait for it, or start this run's own "
                                       "server (drop server.base_url)") from None
                if not said:
                    self.say(f"vLLM at {self.base_url} is in use by {self.holder()}: this run waits for it "
                             f"(server.lease_wait_s={self.wait_s})")
                    said = True
                time.sleep(self.poll_s)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "run_dir": str(self.run_dir),
                                 "since": time.time()}).encode())
        self.fd = fd
        _held.add(self.key)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            _held.discard(self.key)
            os.close(self.fd)  # releases the flock
            self.fd = None
