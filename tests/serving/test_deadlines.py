"""Every call to vLLM has a deadline from config: against a server that accepts and never answers
(a stopped or wedged vLLM, as the trainer sees it) each kind of call ends with `VLLMHungError`
after its own deadline, naming the URL, the call and the key. An attached server is never
restarted: its hang stops the run with that error (the owned server's restart: tests/test_faults.py)."""

from __future__ import annotations

import dataclasses
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from bridges.reload import ReloadBridge
from conftest import loopback_http, make_cfg
from envs.synthetic import DigitsEnv
from runtime.config import DeadlinesConfig, validate
from lab.episodes import OneTurn
from lab.evaluate import Evaluator
from grpo.policy import Policy
from serving.client import VLLMClient
from serving.guard import RestartGuard
from serving.server import VLLMHungError, VLLMServer

# Distinct per kind, so each test shows its call waited its own deadline and no other.
DEADLINES = DeadlinesConfig(sync_s=1.0, sync_s_per_gb=100.0, probe_s=1.5, eval_s=2.0, control_s=0.5)
GENERATE_S = 1.2  # rollout.timeout_s
SLACK_S = 3.0  # a call may end this much after its deadline (thread start, a loaded machine)


class Silent(BaseHTTPRequestHandler):
    """Accepts every connection and request, never answers."""

    release = threading.Event()

    def do_POST(self):
        Silent.release.wait()

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture
def silent():
    """An attached VLLMServer whose URL never answers."""
    with loopback_http(Silent) as url:
        yield VLLMServer("m", args=[], env={}, log_path=None, base_url=url, deadlines=DEADLINES)


def hung(fn, seconds: float) -> VLLMHungError:
    """The error fn raised, after it waited `seconds` and not much longer."""
    t = time.monotonic()
    with pytest.raises(VLLMHungError) as err:
        fn()
    waited = time.monotonic() - t
    assert seconds * 0.9 <= waited < seconds + SLACK_S, waited
    return err.value


def evaluate(client):
    env = DigitsEnv(num_prompts=8)
    evaluator = Evaluator(env, "test", num_prompts=2, n=2, k=2, max_tokens=4, temperature=1.0, every=0)
    return evaluator(client, OneTurn(env, lambda messages: [1, 2, 3]))


@pytest.mark.parametrize("call, route, key, seconds", [
    (lambda s, c: c.generate([[1, 2, 3]], n=2), "POST /v1/completions", "rollout.timeout_s", GENERATE_S),
    (lambda s, c: c.generate([[1, 2], [3, 4]], n=2, seed=5), "POST /v1/completions", "rollout.timeout_s", GENERATE_S),
    (lambda s, c: c.prompt_logprobs([1, 2, 3]), "POST /v1/completions", "server.deadlines.probe_s", 1.5),
    (lambda s, c: evaluate(c), "POST /v1/completions", "server.deadlines.eval_s", 2.0),
    (lambda s, c: s.post("/pause?mode=abort&clear_cache=false"), "POST /pause?mode=abort&clear_cache=false", "server.deadlines.control_s", 0.5),
    (lambda s, c: s.post("/reset_prefix_cache"), "POST /reset_prefix_cache", "server.deadlines.control_s", 0.5),
    (lambda s, c: s.get("/get_world_size"), "GET /get_world_size", "server.deadlines.control_s", 0.5),
], ids=["generate", "generate_seeded", "probe", "eval", "pause", "reset_prefix_cache", "world_size"])
def test_each_call_ends_at_its_own_deadline_naming_the_key(silent, call, route, key, seconds):
    client = VLLMClient(silent, "policy", timeout_s=GENERATE_S)
    err = hung(lambda: call(silent, client), seconds)
    assert (err.url, err.call, err.key, err.seconds) == (silent.base_url, route, key, seconds)
    assert f"vLLM at {silent.base_url} did not answer {route} within" in str(err) and key in str(err)


def test_health_check_gives_up_at_control_deadline(silent):
    t = time.monotonic()
    assert not silent.healthy()
    assert time.monotonic() - t < DEADLINES.control_s + SLACK_S


def test_sync_deadline_grows_with_the_bytes_it_moves(silent, tiny_model_path, tmp_path):
    """A reload push: `server.deadlines.sync_s + sync_s_per_gb * GB` for the bytes it writes."""
    silent.deadlines = dataclasses.replace(DEADLINES, sync_s_per_gb=1000.0)  # the tiny model: ~2 MB
    bridge = ReloadBridge()
    bridge.setup(Policy(tiny_model_path), silent, VLLMClient(silent, "policy"), tmp_path)
    try:
        nbytes = sum(p.numel() * p.element_size() for p in bridge.policy.model.state_dict().values())
        expected = DEADLINES.sync_s + 1000.0 * nbytes / 1e9
        assert expected > DEADLINES.sync_s + 0.5, "the model's bytes must visibly lengthen the deadline"
        err = hung(lambda: bridge.push(1), expected)
    finally:
        bridge.close()
    assert err.call == "POST /collective_rpc" and err.key.startswith("server.deadlines.sync_s + sync_s_per_gb")
    assert err.seconds == pytest.approx(expected, rel=0.05)


def test_attached_server_that_hangs_stops_the_call_naming_url_and_call(silent):
    """The guard never restarts an attached server: one clear error, after the deadline."""
    resyncs = []
    guard = RestartGuard(silent, "m", resync=resyncs.append)
    client = VLLMClient(silent, "policy", timeout_s=GENERATE_S)
    err = hung(lambda: guard.call(3, lambda: client.generate([[1, 2, 3]], n=2)), GENERATE_S)
    assert guard.restarts == 0 and resyncs == []
    assert f"vLLM at {silent.base_url} did not answer POST /v1/completions within 1.2s (rollout.timeout_s)" in str(err)
    assert "attached server (server.base_url) is never restarted" in str(err)


@pytest.mark.parametrize("key", ["sync_s", "sync_s_per_gb", "probe_s", "eval_s", "control_s"])
def test_a_deadline_must_be_positive(key):
    with pytest.raises(ValueError, match=rf"server\.deadlines\.{key}=0\.0: must be > 0"):
        validate(make_cfg(f"server.deadlines.{key}=0"))
