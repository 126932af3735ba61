"""/dev/shm directories of the reload bridge never outlive their process for long."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bridges.shared_memory import SHM, owned_dir
from grpo import REPO_ROOT
from runtime.procfs import STATE, stat_fields


def test_stale_dirs_are_removed_and_a_clean_exit_removes_its_own():
    stale = SHM / "grpo-test-2147483000-1-deadbeef"  # no process has this pid
    stale.mkdir(exist_ok=True)
    (stale / "model.safetensors").write_bytes(b"x" * 1024)
    mine = owned_dir("grpo-test")
    assert not stale.exists() and mine.is_dir()
    child = subprocess.run([sys.executable, "-c", "from bridges.shared_memory import owned_dir; "
                            "d = owned_dir('grpo-test'); (d / 'w').write_bytes(b'1'); print(d)"],
                           cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    made = child.stdout.strip()
    assert made.startswith(str(SHM / "grpo-test-")) and not (SHM / made).exists()
    assert mine.is_dir()  # ours: our process is alive


def test_an_exited_but_unreaped_owner_counts_as_gone():
    """A killed vLLM worker stays a zombie until someone reaps it; its files are stale already."""
    from bridges.shared_memory import process_start

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while stat_fields(child.pid)[STATE] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert process_start(child.pid) is None  # exited, not yet reaped
    assert process_start(os.getpid()) is not None
    child.wait()
