"""Runs survive faults: checkpoints are atomic, NaN updates are skipped and logged, a killed vLLM
is restarted mid-run, a killed trainer resumes from its last complete checkpoint, and the server
is only exposed as configured."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from bridges.base import SyncStats
from serving.server import VLLMServer, server_from_config
from conftest import REPO, make_cfg
from envs.synthetic import DigitsEnv
from grpo import checkpoint
from grpo.logger import RunLogger
from grpo.policy import Policy
from serving.client import Completion
from train import Run, train, train_step

QUIET = ("log.wandb.mode=disabled", "log.progress=false", "train.prompts_per_step=2", "train.group_size=4",
         "rollout.max_tokens=8")


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# -- checkpoints ---------------------------------------------------------------------------------

class SavingPolicy:
    """What checkpoint.save needs of a Policy, on a one-layer model."""

    def __init__(self):
        self.model = torch.nn.Linear(3, 2)

    def save(self, out):
        Path(out).mkdir(parents=True)
        torch.save(self.model.state_dict(), Path(out) / "weights.pt")


def small_run(tmp_path) -> Run:
    policy = SavingPolicy()
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return Run(None, tmp_path, DigitsEnv(num_prompts=8), policy, None, None, None, optimizer, scheduler, None)


def test_checkpoint_round_trip_restores_cursor_rng_and_optimizer(tmp_path):
    run = small_run(tmp_path)
    run.policy.model(torch.ones(1, 3)).sum().backward()
    run.optimizer.step()
    run.env.sample(3)
    torch.manual_seed(5)
    ckpt = checkpoint.save(run, 7)
    expected_prompts, expected_draw = run.env.sample(2), torch.rand(3)

    other = small_run(tmp_path)
    assert checkpoint.load_trainer_state(other, checkpoint.newest_complete(tmp_path)) == 7
    assert ckpt.name == "step-000007" and json.loads((ckpt / "COMPLETE").read_text())["step"] == 7
    assert other.env.sample(2) == expected_prompts
    assert torch.equal(torch.rand(3), expected_draw)
    assert other.optimizer.state_dict()["state"][0]["step"] == 1


def test_partial_checkpoints_are_never_picked(tmp_path):
    run = small_run(tmp_path)
    checkpoint.save(run, 2)
    checkpoint.save(run, 4)
    root = tmp_path / "checkpoints"
    (root / "step-000006").mkdir()  # renamed without a marker (cannot happen, but must not count)
    (root / ".tmp-step-000008-123").mkdir()  # a save killed half-way
    assert checkpoint.newest_complete(tmp_path) == root / "step-000004"
    assert checkpoint.newest_complete(root / "step-000002") == root / "step-000002"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.newest_complete(root / "step-000006")


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = small_run(tmp_path)
    checkpoint.save(run, 2)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(run, 4)
    assert not (tmp_path / "checkpoints" / "step-000004").exists()
    assert checkpoint.newest_complete(tmp_path) == tmp_path / "checkpoints" / "step-000002"


# -- a non-finite loss -----------------------------------------------------------------------------

class FakeClient:
    """Samples random token ids so train_step runs without a server."""

    def generate(self, prompt_ids, n, seed=None):
        g = torch.Generator().manual_seed(seed)
        return [[Completion(torch.randint(10, 200, (4,), generator=g).tolist(), [-1.0] * 4, "12ab", "length")
                 for _ in range(n)] for _ in prompt_ids]


class FakeBridge:
    def step_context(self):
        return contextlib.nullcontext()

    def sync(self, step):
        return SyncStats(step, "fake", 0.0, 0, 0.0, 0.0)


def test_nan_reward_skips_the_update_logs_it_and_the_run_goes_on(tmp_path, tiny_model_path):
    cfg = make_cfg(*QUIET)
    policy = Policy(tiny_model_path)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    env = DigitsEnv()
    attached = VLLMServer("m", args=[], env={}, log_path=tmp_path / "vllm.log", base_url="http://127.0.0.1:9")
    run = Run(cfg, tmp_path, env, policy, attached, FakeClient(), FakeBridge(), optimizer, scheduler,
              RunLogger(tmp_path, cfg, total_steps=2))
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    score = env.score
    env.score = lambda prompts, completions: [[float("nan")] * len(g) for g in completions]

    bad = train_step(run, 1)
    assert bad["skipped_updates"] == 1
    assert all(torch.equal(a, p) for a, p in zip(before, policy.trainable_parameters()))

    env.score = score  # finite rewards again: the next step updates the weights
    good = train_step(run, 2)
    run.logger.close()
    assert good["skipped_updates"] == 0 and torch.isfinite(torch.tensor(good["loss"]))
    assert any(not torch.equal(a, p) for a, p in zip(before, policy.trainable_parameters()))
    events = read_jsonl(tmp_path / "events.jsonl")
    assert [(e["step"], e["event"]) for e in events] == [(1, "skipped_update")]


# -- exposure -------------------------------------------------------------------------------------

class HeaderEcho(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):
        HeaderEcho.seen.append(self.headers.get("Authorization"))
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_server_binds_loopback_unless_configured(tmp_path):
    default = server_from_config(make_cfg(), "m", tmp_path).command()
    assert default[default.index("--host") + 1] == "127.0.0.1"
    assert "--api-key" not in default
    wide = server_from_config(make_cfg("server.host=0.0.0.0"), "m", tmp_path).command()
    assert wide[wide.index("--host") + 1] == "0.0.0.0"


def test_api_key_goes_to_vllm_and_into_every_request(tmp_path):
    server = server_from_config(make_cfg("server.api_key=s3cret"), "m", tmp_path)
    cmd = server.command()
    assert cmd[cmd.index("--api-key") + 1] == "s3cret"
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), HeaderEcho)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        server.base_url = f"http://127.0.0.1:{httpd.server_port}"
        server.post("/v1/completions", {})
    finally:
        httpd.shutdown()
    assert HeaderEcho.seen == ["Bearer s3cret"]


# -- vLLM killed mid-run (own server) -----------------------------------------------------------

def kill_server_after(run_dir: Path, servers: list, step: int, killed: list) -> threading.Thread:
    """SIGKILL the server's whole process group once metrics.jsonl shows `step`."""

    def watch():
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= step):
            time.sleep(0.2)
        os.killpg(servers[0].proc.pid, signal.SIGKILL)
        killed.append(time.time())

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [("mode=reload",), ("mode=lora", "train.lr=1e-2")], ids=["reload", "lora"])
def test_killed_vllm_is_restarted_and_the_run_continues(tmp_path, monkeypatch, overrides):
    servers, killed = [], []
    start = VLLMServer.start

    def recording_start(self):
        if self not in servers:
            servers.append(self)
        return start(self)

    monkeypatch.setattr(VLLMServer, "start", recording_start)
    kill_server_after(tmp_path, servers, 2, killed)
    history = train(make_cfg(*overrides, *QUIET, "train.steps=4"), tmp_path)

    assert killed, "the server was killed"
    assert len(history) == 4 and [m["vllm_restarts"] for m in history] == [0, 0, 1, 1]
    restarts = [e for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "vllm_restart"]
    assert len(restarts) == 1 and restarts[0]["step"] == 3
    syncs = read_jsonl(tmp_path / "sync.jsonl")
    assert all(s["probe_max_diff"] <= 1e-3 for s in syncs)  # every step after the restart is verified


# -- the trainer killed mid-run -----------------------------------------------------------------

@pytest.mark.slow
def test_killed_trainer_resumes_from_last_complete_checkpoint(attach, tmp_path):
    run_dir = tmp_path / "run"
    args = [*QUIET, attach, "train.steps=40", "train.checkpoint_every=2", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run_dir / "checkpoints" / "step-000004" / "COMPLETE"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists()
    root = run_dir / "checkpoints"
    newest = checkpoint.newest_complete(run_dir)
    last = int(newest.name.split("-")[1])
    # A save killed half-way, whether before or after the rename, is never picked.
    (root / f".tmp-step-{last + 2:06d}-1").mkdir(exist_ok=True)
    (root / f"step-{last + 4:06d}").mkdir()

    history = train(make_cfg(*QUIET, attach, f"train.steps={last + 2}", f"resume={run_dir}"), run_dir)
    assert len(history) == 2
    resumed = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resumed"]
    assert resumed[-1]["checkpoint"] == str(newest) and resumed[-1]["step"] == last
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")][-2:] == [last + 1, last + 2]
