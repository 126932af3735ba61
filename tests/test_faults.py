"""Runs survive faults: checkpoints are atomic, NaN updates are skipped and logged, a killed vLLM
is restarted mid-run, a killed trainer resumes from its last complete checkpoint, and the server
is only exposed as configured."""

from __future__ import annotations

from dataclasses import dataclass, field

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from bridges.reload import ReloadBridge
from serving.server import VLLMServer
from lab.server import build_server
from conftest import REPO, SEEDED, make_cfg, run_precision, straight_run
from envs.synthetic import DigitsEnv
from runtime import checkpoint
from grpo.loss import GRPOLoss
from runtime.procfs import STATE, stat_fields
from serving.client import VLLMClient
from serving.guard import RestartGuard
from grpo.seeds import rollout_seed
from lab.loop import train, train_step
from runtime.records import read_jsonl
from support import QUIET, serverless_run, start_trainer_and_kill

HANG_DEADLINE_S = 20  # every deadline of the runs whose vLLM hangs (their calls take < 2 s here)
HANG = (f"rollout.timeout_s={HANG_DEADLINE_S}",
        *(f"server.deadlines.{key}={HANG_DEADLINE_S}" for key in ("sync_s", "probe_s", "eval_s", "control_s")))


# -- checkpoints ---------------------------------------------------------------------------------

class SavingPolicy:
    """What checkpoint.save needs of a Policy, on a one-layer model."""

    def __init__(self):
        self.model = torch.nn.Linear(3, 2)

    def save(self, out):
        Path(out).mkdir(parents=True)
        torch.save(self.model.state_dict(), Path(out) / "weights.pt")


@dataclass
class Trainer:
    """What a checkpoint saves: a policy, its optimizer and the parts with state, all real."""

    policy: SavingPolicy = field(default_factory=SavingPolicy)
    env: DigitsEnv = field(default_factory=lambda: DigitsEnv(num_prompts=8))
    loss: GRPOLoss = field(default_factory=lambda: GRPOLoss(use_adaptive_entropy=True))
    guard: RestartGuard = field(default_factory=lambda: RestartGuard(None, "m", resync=lambda step: None))

    def __post_init__(self):
        self.optimizer = torch.optim.AdamW(self.policy.model.parameters(), lr=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)

    def parts(self) -> dict:
        return {"scheduler": self.scheduler, "env": self.env, "loss": self.loss, "guard": self.guard,
                "rng": checkpoint.RandomState()}

    def save(self, run_dir, step: int) -> Path:
        return checkpoint.save(run_dir, step, self.policy, self.optimizer, self.parts())


def test_checkpoint_round_trip_restores_cursor_rng_and_optimizer(tmp_path):
    run = Trainer()
    run.policy.model(torch.ones(1, 3)).sum().backward()
    run.optimizer.step()
    run.env.sample(3)
    torch.manual_seed(5)
    run.guard.restarts = 2
    run.loss.entropy_bonus.coef, run.loss.entropy_bonus.last_entropy = 0.035, 0.125  # the adaptive bonus's state
    ckpt = run.save(tmp_path, 7)
    expected_prompts, expected_draw = run.env.sample(2), torch.rand(3)

    other = Trainer()
    saved = checkpoint.read(checkpoint.newest_complete(tmp_path))
    checkpoint.restore(saved, other.policy, other.optimizer, other.parts())
    assert saved.step == 7
    assert ckpt.name == "step-000007" and json.loads((ckpt / "COMPLETE").read_text())["step"] == 7
    assert other.env.sample(2) == expected_prompts
    assert torch.equal(torch.rand(3), expected_draw)
    assert other.optimizer.state_dict()["state"][0]["step"] == 1
    assert other.guard.restarts == 2
    assert other.loss.state_dict() == {"entropy_bonus": {"coef": 0.035, "last_entropy": 0.125}}


def test_partial_checkpoints_are_never_picked(tmp_path):
    run = Trainer()
    run.save(tmp_path, 2)
    run.save(tmp_path, 4)
    root = tmp_path / "checkpoints"
    (root / "step-000006").mkdir()  # renamed without a marker (cannot happen, but must not count)
    (root / ".tmp-step-000008-123").mkdir()  # a save killed half-way
    assert checkpoint.newest_complete(tmp_path) == root / "step-000004"
    assert checkpoint.newest_complete(root / "step-000002") == root / "step-000002"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.newest_complete(root / "step-000006")


def test_resume_path_starts_from_the_cwd_and_must_name_something(tmp_path, monkeypatch):
    """resume=run typed in tmp_path is tmp_path/run (train.py keeps the cwd); typed elsewhere it
    names nothing, and says so with the path it looked at."""
    Trainer().save(tmp_path / "run", 3)
    monkeypatch.chdir(tmp_path)
    assert checkpoint.newest_complete("run") == Path("run/checkpoints/step-000003")
    monkeypatch.chdir(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=re.escape(f"resume=run: no such file or directory ({tmp_path}/run/run)")):
        checkpoint.newest_complete("run")


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = Trainer()
    run.save(tmp_path, 2)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        run.save(tmp_path, 4)
    assert not (tmp_path / "checkpoints" / "step-000004").exists()
    assert checkpoint.newest_complete(tmp_path) == tmp_path / "checkpoints" / "step-000002"


# -- a non-finite loss -----------------------------------------------------------------------------

def test_non_finite_gradient_skips_the_update_logs_it_and_the_run_goes_on(tmp_path, tiny_model_path):
    run = serverless_run(tmp_path, tiny_model_path, make_cfg(*QUIET))
    policy = run.policy
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    run.client.logprob = float("nan")  # e.g. an fp16 overflow in vLLM: the IS weights, then the gradient

    bad = train_step(run, 1)
    assert bad["skipped_updates"] == 1
    assert all(torch.equal(a, p) for a, p in zip(before, policy.trainable_parameters()))

    run.client.logprob = -1.0  # finite again: the next step updates the weights
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


def middlewares(cmd: list[str]) -> list[str]:
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--middleware"]


def test_server_binds_loopback_unless_configured(tmp_path):
    default = build_server(make_cfg(), tmp_path, model="m").command()
    assert default[default.index("--host") + 1] == "127.0.0.1"
    assert "--api-key" not in default
    assert middlewares(default) == ["serving.atropos_generate.AtroposGenerate"]  # Atropos' /generate, no key check
    wide = build_server(make_cfg("server.host=0.0.0.0", "server.api_key=k"), tmp_path, model="m").command()
    assert wide[wide.index("--host") + 1] == "0.0.0.0"


@pytest.mark.parametrize("override", ["server.host=0.0.0.0", "server.host=10.1.2.3",
                                      "server.base_url=http://10.1.2.3:8000", "server.base_url=http://example.org"])
def test_no_server_beyond_loopback_without_a_key(tmp_path, override):
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"{key}=.*server\.api_key"):
        build_server(make_cfg(override), tmp_path, model="m")
    build_server(make_cfg(override, "server.api_key=k"), tmp_path, model="m")  # with a key: fine


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"])
def test_loopback_attach_needs_no_key(tmp_path, url):
    assert build_server(make_cfg(f"server.base_url='{url}'"), tmp_path, model="m").external


def test_api_key_guards_every_route_and_goes_into_every_request(tmp_path):
    server = build_server(make_cfg("server.api_key=s3cret"), tmp_path, model="m")
    cmd = server.command()
    # vLLM adds each middleware around the ones before: the key check, last, wraps every route
    assert middlewares(cmd) == ["serving.atropos_generate.AtroposGenerate", "serving.auth.RequireApiKey"]
    assert "s3cret" not in " ".join(cmd)  # the key goes by environment, not where `ps` shows it
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
@pytest.mark.parametrize("overrides", [pytest.param(("mode=reload",), marks=pytest.mark.heavy),
                                       pytest.param(("mode=lora", "optimizer.lr=1e-2"), marks=pytest.mark.heavy)],
                         ids=["reload", "lora"])
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
    tol = run_precision(tmp_path).probe_tolerance
    assert all(s["probe_max_diff"] <= tol for s in syncs)  # every step after the restart is verified


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGSTOP, marks=pytest.mark.heavy)],
                         ids=["killed", "hung"])
def test_killed_vllm_with_a_rollout_in_flight_regenerates_it(tmp_path, monkeypatch, sig):
    """Async (k = 1): vLLM is killed (or stopped: it hangs) as the producer sends step 4's request,
    beside step 3's training. The restart re-syncs the trainer's weights once its optimizer step is
    done (version 3) and step 4's rollout is generated again, tagged with the version it really got.
    The restart path is the synchronous loop's (RestartGuard) plus the producer's re-sync."""
    cfg = make_cfg("train.max_staleness=1", *QUIET, *(HANG if sig == signal.SIGSTOP else ()), "train.steps=4")
    generate, killed = VLLMClient.generate, []

    def killing_generate(self, prompt_ids, n, seed=None):
        if seed == rollout_seed(cfg.train.seed, 4) and not killed:
            os.killpg(self.server.proc.pid, sig)
            killed.append(time.time())
        return generate(self, prompt_ids, n, seed=seed)

    monkeypatch.setattr(VLLMClient, "generate", killing_generate)
    history = train(cfg, tmp_path)

    assert killed and len(history) == 4 and history[-1]["vllm_restarts"] == 1
    restarts = [e for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "vllm_restart"]
    assert len(restarts) == 1 and restarts[0]["step"] == 4  # the producer's request for step 4
    assert (restarts[0]["reason"] == "hung") == (sig == signal.SIGSTOP)
    assert [m["policy_version"] for m in history] == [0, 0, 1, 3]  # scheduled 2; the restart pushed 3
    assert [m["staleness"] for m in history] == [0, 1, 1, 0]
    tol = run_precision(tmp_path).probe_tolerance
    assert all(s["probe_max_diff"] <= tol for s in read_jsonl(tmp_path / "sync.jsonl"))


# -- vLLM hung mid-run (own server) ---------------------------------------------------------------

@pytest.mark.slow
def test_hung_vllm_is_killed_restarted_and_the_run_repeats_the_straight_one(attach, tmp_path, tmp_path_factory,
                                                                            monkeypatch):
    """The issue's hang: the server's process group is stopped (alive, never answering, as a
    wedged engine or a stuck collective looks) as step 3's reload push begins. Past the sync's
    deadline its `POST /collective_rpc` raises VLLMHungError; the guard SIGKILLs the group,
    restarts vLLM, re-syncs and redoes the sync: the run ends with the straight run's numbers (the
    same config on the session server), one `vllm_restart` with reason `hung`, and step 3 longer
    by about the deadline + the restart, not by the 600 s it used to wait before dying."""
    straight = straight_run(tmp_path_factory, "mode=reload", attach, *SEEDED, "train.steps=6")
    push, stopped = ReloadBridge.push, []

    def stopping_push(self, step):
        if step == 3 and not stopped:
            os.killpg(self.server.proc.pid, signal.SIGSTOP)
            stopped.append(step)
        return push(self, step)

    monkeypatch.setattr(ReloadBridge, "push", stopping_push)
    history = train(make_cfg("mode=reload", *SEEDED, *HANG, "train.steps=6"), tmp_path)

    assert stopped and len(history) == 6
    restarts = [e for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "vllm_restart"]
    assert len(restarts) == 1, restarts
    hung = restarts[0]
    assert (hung["step"], hung["reason"], hung["call"]) == (3, "hung", "POST /collective_rpc")
    assert hung["key"].startswith("server.deadlines.sync_s + sync_s_per_gb")
    assert HANG_DEADLINE_S <= hung["deadline_s"] < HANG_DEADLINE_S + 1  # + 60 s/GB of a ~2 MB model
    assert [m["vllm_restarts"] for m in history] == [0, 0, 1, 1, 1, 1]
    print(json.dumps({"restart_s": hung["restart_s"], "steps_s": [round(m["time_step"], 1) for m in history]}))
    assert history[2]["time_step"] < HANG_DEADLINE_S + hung["restart_s"] + 30
    # The same completions: equal rewards. The two servers' sampled logprobs differ by ~1e-7 (the
    # session server has LoRA enabled), so the gradients agree to ~2e-7 and the loss (~1e-8, the
    # advantages' mean being 0) only to that noise.
    for step, (a, b) in enumerate(zip(straight, history), 1):
        for key in ("reward_mean", "reward_std", "completion_len_mean"):
            assert b[key] == a[key], (step, key)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), step
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), step
    assert len({m["reward_mean"] for m in history}) > 1  # not a run where nothing moved
    assert all(s["probe_max_diff"] <= 1e-3 for s in read_jsonl(tmp_path / "sync.jsonl"))


# -- the trainer killed mid-run -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("staleness", [pytest.param(0, marks=pytest.mark.heavy), 1], ids=["sync", "async"])
def test_killed_trainer_resumes_from_last_complete_checkpoint(attach, tmp_path, staleness):
    """SIGKILL mid-run; the resumed run starts from the newest complete checkpoint. Async (k = 1)
    loses only what was in flight after it: the rollout generated ahead is in the checkpoint."""
    run_dir = tmp_path / "run"
    args = [*QUIET, attach, "train.steps=40", "train.checkpoint_every=2", f"train.max_staleness={staleness}",
            f"hydra.run.dir={run_dir}"]
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

    history = train(make_cfg(*QUIET, attach, f"train.steps={last + 2}", f"train.max_staleness={staleness}",
                             f"resume={run_dir}"), run_dir)
    assert len(history) == 2
    resumed = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resumed"]
    assert resumed[-1]["checkpoint"] == str(newest) and resumed[-1]["step"] == last
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")][-2:] == [last + 1, last + 2]
    if staleness:  # step last+1 trains the saved rollout (version last-1); last+2's is generated on the resumed weights
        assert [(m["policy_version"], m["staleness"]) for m in history] == [(last - 1, 1), (last, 1)]


# -- the trainer killed: its vLLM goes with it ----------------------------------------------------

@pytest.mark.slow
@pytest.mark.heavy  # a server of its own each; CI checks the lifeline itself in tests/serving/test_lifeline.py
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_trainer_takes_its_server_along(tmp_path, sig):
    code, pids, trainer_s, gone_s = start_trainer_and_kill(tmp_path, sig)
    print(json.dumps({"signal": sig.name, "server_pids": pids, "trainer_gone_s": round(trainer_s, 1),
                      "server_gone_s": round(gone_s, 1), "trainer_exit": code}))
    assert len(pids) >= 4  # lifeline, API server, engine core, worker
    assert not [p for p in pids if (fields := stat_fields(p)) is not None and fields[STATE] != "Z"]
    if sig == signal.SIGKILL:  # the lifeline stops the group: SIGTERM, SIGKILL after GRACE_S=10
        assert gone_s < 15
    else:  # the trainer's own cleanup stopped its server before it exited, and said why it stopped
        assert code == 128 + signal.SIGTERM and gone_s - trainer_s < 1
