"""Env services as real subprocesses (`python -m envs.serve`), for the tests that use them."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator

import requests

from conftest import REPO

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(*overrides: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([PY, "-m", "envs.serve", f"server.port={port}", *overrides], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"env service exited: {proc.stdout.read()}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("env service did not answer /health in 60 s")


@contextlib.contextmanager
def served(*overrides: str, port: int | None = None) -> Iterator[str]:
    """`python -m envs.serve <overrides>` as a subprocess; yields its URL."""
    port = port or free_port()
    proc = start_service(*overrides, port=port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
