"""serving/lease.py: runs attached to one vLLM server take turns, with real processes holding the
lease; the kernel frees it when its holder dies, even by SIGKILL."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from serving.lease import LeaseTimeout, ServerLease, lease_key

URL = "http://localhost:8123/"


def hold(directory, seconds: float) -> subprocess.Popen:
    """Another process holding the lease on URL for `seconds`; it prints once it holds it."""
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from serving.lease import ServerLease
        with ServerLease({URL!r}, Path("/runs/other"), directory=Path({str(directory)!r})):
            print("held", flush=True)
            time.sleep({seconds})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_one_server_is_one_key_however_it_is_spelled():
    assert lease_key("http://localhost:8123/") == lease_key("http://127.0.0.1:8123") == "127.0.0.1_8123"
    assert lease_key("http://10.0.0.2:8123") != lease_key("http://127.0.0.1:8123")


def test_a_run_waits_until_the_holder_lets_go_and_is_told_who_holds_it(tmp_path):
    other = hold(tmp_path, 2.0)
    said = []
    start = time.monotonic()
    with ServerLease("http://127.0.0.1:8123", tmp_path / "mine", directory=tmp_path, say=said.append, poll_s=0.05):
        waited = time.monotonic() - start
    other.wait(10)
    assert 1.0 < waited < 10.0
    assert len(said) == 1 and f"pid {other.pid}" in said[0] and "/runs/other" in said[0]


def test_a_holder_that_outlives_lease_wait_s_fails_the_run_naming_the_key(tmp_path):
    other = hold(tmp_path, 30.0)
    try:
        with pytest.raises(LeaseTimeout, match=r"server.lease_wait_s=0.3.*drop server.base_url"):
            with ServerLease(URL, None, wait_s=0.3, directory=tmp_path, say=lambda _: None, poll_s=0.05):
                pass
    finally:
        other.kill()
        other.wait()


def test_a_killed_holder_frees_the_server(tmp_path):
    other = hold(tmp_path, 60.0)
    other.kill()  # SIGKILL: no exit handler runs
    other.wait()
    with ServerLease(URL, None, wait_s=2.0, directory=tmp_path, say=pytest.fail):
        pass


def test_a_run_not_closed_in_this_process_is_named_instead_of_waited_on(tmp_path):
    with ServerLease(URL, None, directory=tmp_path):
        with pytest.raises(RuntimeError, match="already holds the lease.*not closed"):
            with ServerLease(URL, None, directory=tmp_path):
                pass
    with ServerLease(URL, None, wait_s=1.0, directory=tmp_path, say=pytest.fail):  # let go on exit
        pass
