"""`python -m lab.serve` with an API key, against a real vLLM server: every route but /health
answers 401 without the key (vLLM's own --api-key guards only /v1), a trainer that attaches with
the key trains through its bridge, and SIGTERM stops the server with all its processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import requests

from conftest import REPO, make_cfg, run_precision
from serving.lifeline import group_members
from serving.server import free_port
from runtime.records import read_jsonl
from support import QUIET, server_group
from lab.loop import train

pytestmark = pytest.mark.slow

KEY = "k3y-for-tests"
# Dev routes our bridges use, weight transfer, and vLLM's own: none may answer without the key.
GUARDED = [("POST", "/collective_rpc", {"method": "refresh_cpu_weights"}), ("POST", "/pause", None),
           ("POST", "/resume", None), ("POST", "/reset_prefix_cache", None),
           ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nonexistent"}),
           ("POST", "/init_weight_transfer_engine", {"init_info": {}}), ("POST", "/update_weights", {}),
           ("POST", "/v1/completions", {"model": "policy", "prompt": [1, 2], "max_tokens": 1}),
           ("GET", "/v1/models", None), ("GET", "/metrics", None), ("GET", "/version", None),
           ("GET", "/openapi.json", None), ("GET", "/get_world_size", None),
           # Atropos' routes (serving/atropos_generate.py), inside the key check
           ("POST", "/generate", {"prompt": {"prompt_token_ids": [1, 2]}, "max_tokens": 1}),
           ("POST", "/atropos/generate_model", {"model": None})]


@pytest.fixture
def served(tmp_path):
    """`python -m lab.serve server.api_key=...` on a free port; yields its URL and process."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lab.serve", f"server.port={port}", f"server.api_key={KEY}",
                             f"hydra.run.dir={tmp_path / 'serve'}"], cwd=REPO, stdout=open(tmp_path / "serve.log", "w"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.5)
    assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
    try:
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_guards_every_route_and_a_trainer_attaches_with_the_key(served, tmp_path):
    url, proc = served
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    for method, path, body in GUARDED:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            resp = requests.request(method, url + path, json=body, headers=headers, timeout=30)
            assert resp.status_code == 401, (method, path, headers, resp.status_code, resp.text[:200])
    ok = requests.post(f"{url}/reset_prefix_cache", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert ok.status_code == 200  # the route is there: the 401s were the key's doing
    # serve prints the line once its own health poll sees the server: a moment after ours may.
    expected, log, deadline = f"server.base_url=http://127.0.0.1:{url.rsplit(':', 1)[1]}", "", time.monotonic() + 60
    while expected not in log and time.monotonic() < deadline:
        time.sleep(0.5)
        log = (tmp_path / "serve.log").read_text()
    assert expected in log, log[-2000:]

    # A trainer attached with the key: reload syncs (dev routes) verified at every step.
    history = train(make_cfg(*QUIET, "train.steps=2", f"server.base_url={url}", f"server.api_key={KEY}"),
                    tmp_path / "run")
    syncs = read_jsonl(tmp_path / "run" / "sync.jsonl")
    assert len(history) == 2 and [s["step"] for s in syncs] == [1, 2]
    # serve and the trainer both take model.dtype=auto: bf16 where the CPU has it, fp32 elsewhere.
    tol = run_precision(tmp_path / "run").probe_tolerance
    assert all(s["probe_max_diff"] <= tol and s["bytes"] > 0 for s in syncs)

    # SIGTERM (docker stop, scancel): serve stops its server's whole process group, then exits.
    pgid = server_group(proc.pid)
    pids = sorted({pgid, *group_members(pgid)})
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    print(json.dumps({"server_pids": pids, "serve_exit": code, "stop_s": round(time.monotonic() - t, 1)}))
    assert code == 128 + signal.SIGTERM and len(pids) >= 4 and group_members(pgid) == []
