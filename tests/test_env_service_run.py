"""Runs whose env lives outside the trainer: a seeded run is the same with its env served as with it
local, through a resume against a restarted service; a reasoning-gym run. (Several services feeding
one run: tests/experiments/test_notebooks.py, which also draws their per-env curves.)"""

from __future__ import annotations

import math
import threading
import time

import pytest

from conftest import SEEDED as RUN
from conftest import make_cfg, straight_run
from envs.serve import free_port, served, spawn
from lab.loop import train

pytestmark = pytest.mark.slow
SAME = ("reward_mean", "reward_std", "reward_nan", "reward/digits", "completion_len_mean", "loss", "grad_norm", "kl")


def test_a_seeded_run_is_the_same_with_its_env_served(attach, tmp_path, tmp_path_factory):
    local = straight_run(tmp_path_factory, "mode=reload", attach, *RUN, "train.steps=6")  # shared with test_resume
    served_run = tmp_path / "served"
    with served("env=synthetic") as url:
        first = train(make_cfg("mode=reload", attach, *RUN, "train.steps=3", "env=remote", f"env.url={url}",
                               "rollout.max_tokens=8"), served_run)
    # another service process (another port), as after a crash: the checkpoint's state goes into it
    with served("env=synthetic") as url:
        rest = train(make_cfg("mode=reload", attach, *RUN, "train.steps=6", "env=remote", f"env.url={url}",
                              "rollout.max_tokens=8", f"resume={served_run}"), served_run)
    assert len(first) == len(rest) == 3
    for step, (a, b) in enumerate(zip(local, first + rest), 1):
        for key in SAME:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (step, key)


def test_a_service_killed_and_restarted_mid_run_costs_nothing_else(attach, tmp_path, tmp_path_factory):
    """Killed after step 3 (nothing in flight: the in-flight case is tests/envs/test_remote.py's),
    restarted 1.5 s later by a supervisor: the trainer's retries reach it, it gets the trainer's
    state back, and the run is the local run step for step."""
    local = straight_run(tmp_path_factory, "mode=reload", attach, *RUN, "train.steps=6")
    port = free_port()
    procs, restarted = [spawn("env=synthetic", port=port)], []

    def supervisor():
        metrics = tmp_path / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.05)
        procs[0].kill()
        procs[0].wait()
        time.sleep(1.5)
        procs.append(spawn("env=synthetic", port=port))
        restarted.append(time.monotonic())

    thread = threading.Thread(target=supervisor, daemon=True)
    thread.start()
    try:
        history = train(make_cfg("mode=reload", attach, *RUN, "train.steps=6", "env=remote",
                                 f"env.url=http://127.0.0.1:{port}", "env.retries=5"), tmp_path)
        ended = time.monotonic()
        thread.join(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert restarted[0] < ended  # killed and restarted while the run went on (it waited on its retries)
    for step, (a, b) in enumerate(zip(local, history), 1):
        for key in SAME:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (step, key)


def test_reasoning_gym_run_trains_and_evaluates(attach, tmp_path):
    history = train(make_cfg("mode=reload", attach, *RUN, "train.steps=2", "env=reasoning_gym",
                             "env.task={basic_arithmetic: 1, leg_counting: 1}", "eval.num_prompts=4"), tmp_path)
    assert len(history) == 2 and all(0.0 <= m["reward/correct"] <= 1.0 for m in history)
    assert all(math.isfinite(m["loss"]) for m in history)
    assert (tmp_path / "eval.jsonl").is_file()
