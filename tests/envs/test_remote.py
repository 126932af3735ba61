"""An env served by `python -m envs.serve` in a real subprocess and used through `env=remote` behaves
as the local env does (the same tests run on both), and its faults end as the issue says: 4xx
stops naming the request, 5xx / a dead service / a hang gives NaN for the samples in flight, a
restarted service gets the trainer's state back, bad URLs, keys and protocols fail at start."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Iterator

import pytest
import requests

from conftest import REPO, loopback_http
from envs.reasoning_gym import ReasoningGymEnv
from envs.remote import EnvServiceError, RemoteEnv
from envs.serve import free_port, served, spawn
from envs.synthetic import DigitsEnv

LOCAL = {"synthetic": lambda seed: DigitsEnv(seed=seed),
         "reasoning_gym": lambda seed: ReasoningGymEnv(task={"basic_arithmetic": 1, "leg_counting": 1}, seed=seed)}
SERVE = {"synthetic": ("env=synthetic",),
         "reasoning_gym": ("env=reasoning_gym", "env.task=[basic_arithmetic,leg_counting]")}


@pytest.fixture(scope="module", params=["synthetic", "reasoning_gym"])
def service(request) -> Iterator[tuple[str, str]]:
    """One served env per kind for the module (seed 3); each test's RemoteEnv resets it."""
    with served(*SERVE[request.param], "train.seed=3") as url:
        yield request.param, url


@pytest.fixture(params=["local", "served"])
def make_env(request, service):
    """The env under test, built locally or reached through its service: the same tests run on both."""
    kind, url = service

    def make():
        return LOCAL[kind](3) if request.param == "local" else \
            RemoteEnv(url=url, timeout_s=30, retries=1, backoff_s=0.1, max_tokens=LOCAL[kind](3).max_tokens)
    return make


def test_sampling_is_the_seeded_sequence(make_env, service):
    env = make_env()
    assert env.sample(7) + env.sample(5) == LOCAL[service[0]](3).sample(12)


def test_resume_is_exact(make_env, service):
    env = make_env()
    env.sample(9)
    state = json.loads(json.dumps(env.state_dict()))  # what a checkpoint keeps
    expected = env.sample(4)
    resumed = make_env()
    resumed.load_state_dict(state)
    assert resumed.sample(4) == expected


def test_held_out_prompts_fixed_and_a_bad_split_names_the_key(make_env, service):
    env = make_env()
    first = env.eval_prompts("test", 4)
    env.sample(20)
    assert env.eval_prompts("test", 4) == first == LOCAL[service[0]](3).eval_prompts("test", 4)
    with pytest.raises(ValueError, match=r"eval.split='nope'"):
        env.eval_prompts("nope", 4)


def test_scores_and_success_are_the_envs(make_env, service):
    env, local = make_env(), LOCAL[service[0]](3)
    prompts = env.sample(3)
    completions = [["123", "a1", f"<answer>{prompts[0].answer}</answer>"], [prompts[1].answer, ""], ["x 9"]]
    scores = env.score(prompts, completions)
    assert scores == local.score(prompts, completions)
    assert [env.success(s) for g in scores for s in g] == [local.success(s) for g in scores for s in g]
    assert env.reward_weights.weights == local.reward_weights.weights


def test_corpus_is_the_envs(make_env, service):
    assert list(make_env().corpus())[:50] == list(LOCAL[service[0]](3).corpus())[:50]


class Handler(BaseHTTPRequestHandler):
    """A service that speaks another protocol, or hangs on /score (a slow judge)."""

    release = threading.Event()
    protocol_version_ = 99

    def log_message(self, *args):
        pass

    def _json(self, body: dict):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._json({"name": "odd", "protocol": type(self).protocol_version_, "reward_weights": {"r": 1.0},
                    "max_tokens": 16,
                    "instance": "a", "initial_state": {}})

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/score":
            self.release.wait(30)  # hangs until the test ends; its client has long gone
            return
        self._json({"instance": "a"})


def test_another_protocol_version_fails_at_start_naming_url():
    Handler.protocol_version_ = 99
    with loopback_http(Handler) as url:
        with pytest.raises(ValueError, match=rf"env.url={url} speaks env service protocol 99; this trainer speaks 1"):
            RemoteEnv(url=url)


def test_a_hanging_score_times_out_into_nan_never_hangs():
    from envs.service import PROTOCOL
    from grpo.data import Prompt

    Handler.protocol_version_ = PROTOCOL
    with loopback_http(Handler) as url:
        env = RemoteEnv(url=url, timeout_s=0.5, retries=1, backoff_s=0.1)
        began = time.monotonic()
        scores = env.score([Prompt([], "1")], [["1", "2"]])
        assert scores == [[{"r": None}, {"r": None}]]  # NaN rewards, counted as reward_nan
        assert time.monotonic() - began < 3  # 2 tries of 0.5 s + 0.1 s backoff


def test_unreachable_url_fails_at_start_naming_key_and_value():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ValueError, match=rf"env.url={url}: no env service answers there"):
        RemoteEnv(url=url, retries=1, backoff_s=0.05)
    with pytest.raises(ValueError, match=r"env.url\[0\]=http://192.0.2.1:8100 is not on this machine.*env.api_key"):
        RemoteEnv(url=["http://192.0.2.1:8100"])  # checked before any connection


def test_a_4xx_or_another_budget_stops_the_run_naming_env_and_request():
    with served("env=synthetic") as url:
        with pytest.raises(ValueError, match=r"env.max_tokens=32: the served env answers within 16 tokens.*"
                                             r"set env.max_tokens=16"):
            RemoteEnv(url=url, max_tokens=32)
        env = RemoteEnv(url=url)
        with pytest.raises(EnvServiceError, match=rf"POST /score to env service at env.url={url}: HTTP 422"):
            env.services[0].call("POST", "/score", {"prompts": "not a list"})


def test_api_key_guards_every_route_but_health():
    with served("env=synthetic", "server.api_key=s3cret") as url:
        assert requests.get(f"{url}/health", timeout=5).ok
        assert requests.get(f"{url}/info", timeout=5).status_code == 401
        with pytest.raises(EnvServiceError, match="HTTP 401.*set env.api_key"):
            RemoteEnv(url=url)
        assert len(RemoteEnv(url=url, api_key="s3cret").sample(2)) == 2


def test_service_beyond_loopback_needs_a_key():
    proc = subprocess.run([sys.executable, "-m", "envs.serve", "server.host=0.0.0.0", f"server.port={free_port()}"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "server.host=0.0.0.0" in proc.stderr and "server.api_key" in proc.stderr


def test_killed_service_costs_only_the_samples_in_flight():
    port = free_port()
    proc = spawn("env=synthetic", "train.seed=3", port=port)
    try:
        env = RemoteEnv(url=f"http://127.0.0.1:{port}", retries=2, backoff_s=0.1, timeout_s=5)
        local = DigitsEnv(seed=3)
        assert env.sample(8) == local.sample(8)
        in_flight = env.sample(4)
        local.sample(4)
        proc.kill()  # dies with those 4 prompts' completions unscored
        proc.wait()
        assert env.score(in_flight, [["1"], ["2"], ["3"], ["4"]]) == [[{"digits": None}]] * 4  # NaN, counted
        proc = spawn("env=synthetic", "train.seed=3", port=port)  # a supervisor restarts it
        assert env.sample(6) == local.sample(6)  # it got our state back: nothing else lost
        texts = [["1"], ["a"], ["3"], ["4"]]
        assert env.score(in_flight, texts) == local.score(in_flight, texts)
    finally:
        proc.kill()
        proc.wait()


def test_several_services_feed_one_run_by_weight():
    with served("env=synthetic") as digits, served("env=reasoning_gym") as gym:
        env = RemoteEnv(url=[digits, gym], weights=[3, 1], seed=0, max_tokens=32)  # the larger budget
        prompts = env.sample(400)
        share = sum(p.meta["env"] == "synthetic" for p in prompts) / 400
        assert share == pytest.approx(0.75, abs=0.05)
        assert [p.meta["env"] for p in prompts[:40]] == [p.meta["env"] for p in
                                                        RemoteEnv(url=[digits, gym], weights=[3, 1],
                                                                  max_tokens=32).sample(40)]
        pick = [next(p for p in prompts if p.meta["env"] == name) for name in ("synthetic", "reasoning_gym")]
        scores = env.score(pick, [["12", "1a"], [f"<answer>{pick[1].answer}</answer>", "no"]])
        assert scores == [[{"reward": 1.0, "solved": 1.0}, {"reward": 0.5, "solved": 0.0}],
                          [{"reward": 1.0, "solved": 1.0}, {"reward": 0.0, "solved": 0.0}]]
        assert env.reward_weights.weights == {"reward": 1.0, "solved": 0.0}
        assert [env.success(s) for g in scores for s in g] == [True, False, True, False]
