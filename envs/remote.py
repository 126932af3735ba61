"""`env=remote env.url=http://host:port`: an env served by `python -m envs.serve` (envs/service.py),
used exactly as if it were local; several URLs (`env.url=[a, b]`, `env.weights=[3, 1]`) feed one run.
A multi-turn env served (its /info says so) makes this a multi-turn env (envs/episode.py) for the
episode loop (lab/episodes.py): `start` posts /episodes, each `step` posts the turn, the loop
deletes the episode when done with it.

Faults, by what they mean:
- a 4xx is a request the service will never accept (bad split, wrong key, malformed prompt): the
  run stops, the error naming the env, the URL and the request (`Refused`: a `StopRun`, which the
  episode loop lets through);
- a 5xx, a refused connection or a timeout may pass: retried `retries` times with backoff
  (`backoff_s`, doubling); then a /score gives NaN for those samples (counted as `reward_nan`,
  the run goes on), an episode's start or step ends that episode as an env error (reward NaN),
  and any other call stops the run naming the URL; a step is retried with the same turn number,
  which the service answers with the reply it gave (idempotent on (id, turn));
- a service that restarted (new instance id) gets the trainer's last state back before it samples
  again, so it loses only the requests in flight; an episode it no longer knows (404) ends as an
  env error, the other episodes and the run go on. Every call has a timeout: nothing hangs.

State lives here: every /sample answers the env's state, kept as this env's `state_dict()`, so a
checkpoint holds it and a resumed run restores it into the service. At start each service is put
back in its initial state: a seeded run samples the same whatever the service served before (one
service feeds one run at a time).

Several services: each prompt's service is drawn by weight (seeded by `seed` and the prompt's
position: exact resume) and tagged `meta["env"]` (per-env reward curves: `reward_env/<name>`, grpo/batch.py).
Their reward components may differ, so a mix reports two: `reward`, each service's own weighted
total, and `solved` (weight 0: logged, not trained on), the service's success verdict.
"""

from __future__ import annotations

import random
import time
from typing import Iterator, Mapping, Optional, Sequence, Union
from urllib.parse import urlparse

import requests

from envs.episode import Reply, StopRun
from envs.service import PROTOCOL, prompt_from_json, prompt_to_json
from grpo.data import Prompt, RewardWeights, Scores
from serving.server import is_loopback


class EnvServiceError(RuntimeError):
    """The service refused a request (4xx), or stayed unreachable through every retry: stop the run."""


class Refused(EnvServiceError, StopRun):
    """4xx: a request the service will never accept."""


class Gone(EnvServiceError):
    """404 on an episode: the service does not know its id (it restarted): that episode ends."""


class Unavailable(EnvServiceError):
    """5xx, refused connection or timeout through every retry."""


class Restarted(EnvServiceError):
    """409 on /sample: the service is not the process our state came from (it restarted)."""


class Service:
    """One env service: its calls with timeout, retries and restart recovery."""

    def __init__(self, url: str, key: str, api_key: Optional[str], timeout_s: float, retries: int,
                 backoff_s: float):
        self.url, self.key = url.rstrip("/"), key
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        elif not is_loopback(urlparse(self.url).hostname or self.url):
            raise ValueError(f"{key}={url} is not on this machine (loopback) and env.api_key is not set: start "
                             "the service with server.api_key=<key> and set env.api_key to the same")
        self.info = self.call("GET", "/info")
        if self.info.get("protocol") != PROTOCOL:
            raise ValueError(f"{key}={url} speaks env service protocol {self.info.get('protocol')!r}; this "
                             f"trainer speaks {PROTOCOL}: run the service from the same grpo-lab version")
        self.name: str = self.info["name"]
        self.instance: str = self.info["instance"]
        self.state: dict = self.info["initial_state"]
        self.call("POST", "/state", {"state": self.state})  # a seeded run starts where a fresh env would

    def call(self, method: str, path: str, body: Optional[dict] = None) -> dict:
        """The JSON answer; retried on 5xx / connection errors / timeouts, then `Unavailable`."""
        where = f"{method} {path} to env service at {self.key}={self.url}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                resp = self.session.request(method, self.url + path, json=body, timeout=(5.0, self.timeout_s))
            except requests.RequestException as exc:  # refused, reset, timed out
                last = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:500]}"
                continue
            if resp.status_code == 401:
                raise Refused(f"{where}: HTTP 401, the service wants a key: set env.api_key to its "
                              "server.api_key")
            if resp.status_code == 404:
                raise Gone(f"{where}: HTTP 404: {resp.text[:500]}")
            if resp.status_code == 409:
                raise Restarted(f"{where}: the service restarted")
            if resp.status_code >= 400:
                raise Refused(f"{where}: HTTP {resp.status_code}: {resp.text[:2000]}")
            return resp.json()
        raise Unavailable(f"{where}: no answer after {self.retries + 1} tries ({last})")

    def sample(self, n: int) -> list[Prompt]:
        for _ in range(2):
            try:
                out = self.call("POST", "/sample", {"n": n, "instance": self.instance})
            except Restarted:
                self.restore()  # give the new process our state, then sample again
                continue
            self.state = out["state"]
            return [prompt_from_json(p) for p in out["prompts"]]
        raise EnvServiceError(f"env service at {self.key}={self.url} restarted again while being restored")

    def restore(self) -> None:
        self.instance = self.call("POST", "/state", {"state": self.state})["instance"]

    def score(self, prompts: list[Prompt], completions: list[list[str]]) -> Optional[Scores]:
        """The service's scores, or None if it stayed unavailable (those samples get NaN)."""
        try:
            return self.call("POST", "/score", {"prompts": [prompt_to_json(p) for p in prompts],
                                                "completions": completions})["scores"]
        except Unavailable:
            return None

    def success(self, components: list[Mapping[str, Optional[float]]]) -> list[bool]:
        return self.call("POST", "/success", {"components": [dict(c) for c in components]})["success"]

    def discard(self, path: str) -> None:
        """DELETE `path` once, best effort: a service that cannot answer has lost it already."""
        try:
            self.session.delete(self.url + path, timeout=(1.0, min(self.timeout_s, 5.0)))
        except requests.RequestException:
            pass


class RemoteEpisode:
    """An episode living in the service; turn numbers make a retried step answer the same reply."""

    def __init__(self, service: Service, prompt: Prompt, seed: int):
        self.service, self.turn = service, 0
        self.id = service.call("POST", "/episodes", {"prompt": prompt_to_json(prompt), "seed": seed})["id"]

    def step(self, text: str) -> Reply:
        self.turn += 1
        out = self.service.call("POST", f"/episodes/{self.id}/step", {"turn": self.turn, "text": text})
        return Reply(out["messages"], out["done"], out.get("info") or {})

    def close(self) -> None:
        self.service.discard(f"/episodes/{self.id}")


class RemoteEnv:
    def __init__(self, url: Union[str, Sequence[str]], weights: Optional[Sequence[float]] = None,
                 api_key: Optional[str] = None, seed: int = 0, timeout_s: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.5, reward_weights: Optional[Mapping[str, float]] = None,
                 max_tokens: int = 16, max_turns: int = 1, max_total_tokens: Optional[int] = None):
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("env.url: give the URL of an env service (python -m envs.serve ...)")
        keys = ["env.url"] if isinstance(url, str) else [f"env.url[{i}]" for i in range(len(urls))]
        self.weights = [1.0] * len(urls) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(urls) or any(w < 0 for w in self.weights) or not any(self.weights):
            raise ValueError(f"env.weights={weights}: one weight >= 0 per env.url ({len(urls)}), not all 0")
        self.services = [self._connect(u, k, api_key, timeout_s, retries, backoff_s) for u, k in zip(urls, keys)]
        self.seed, self.position, self.max_tokens = seed, 0, max_tokens
        served = max(s.info["max_tokens"] for s in self.services)
        if served != max_tokens:
            raise ValueError(f"env.max_tokens={max_tokens}: the served env answers within {served} tokens (its "
                             f"env.max_tokens); set env.max_tokens={served}")
        self._episodes_as_served({"max_turns": max_turns, "max_total_tokens": max_total_tokens})
        if len(self.services) == 1:
            self.reward_weights = RewardWeights(self.services[0].info["reward_weights"], reward_weights)
        else:
            self.reward_weights = RewardWeights({"reward": 1.0, "solved": 0.0}, reward_weights)

    def _episodes_as_served(self, asked: dict) -> None:
        """The episode budget (rollout.* follow env.*) must be the served env's; a multi-turn one
        gets its stop tokens, tools and `start`, which makes this env multi-turn to the loop."""
        multi = [s for s in self.services if s.info.get("multi_turn")]
        if multi and self.mixed:
            raise ValueError(f"env.url: {multi[0].key}={multi[0].url} serves a multi-turn env; a mix of services "
                             "serves single-turn envs only")
        info = self.services[0].info
        for key, value in asked.items():
            served = info.get(key, 1 if key == "max_turns" else None)
            if served != value:
                raise ValueError(f"env.{key}={value}: the served env's env.{key} is {served}; set env.{key}={served}")
        self.max_turns, self.max_total_tokens = asked["max_turns"], asked["max_total_tokens"]
        if multi:
            self.stop_tokens, self.tools = tuple(info["stop_tokens"]), info["tools"]
            self.max_tool_chars = info["max_tool_chars"]
            self.start = self._start

    def _start(self, prompt: Prompt, seed: int) -> RemoteEpisode:
        return RemoteEpisode(self.services[0], prompt, seed)

    @staticmethod
    def _connect(url, key, api_key, timeout_s, retries, backoff_s) -> Service:
        try:
            return Service(url, key, api_key, timeout_s, retries, backoff_s)
        except Unavailable as exc:
            raise ValueError(f"{key}={url}: no env service answers there ({exc}); start one with "
                             "`python -m envs.serve env=<name> server.port=<port>`") from exc

    @property
    def mixed(self) -> bool:
        return len(self.services) > 1

    def _draws(self, n: int) -> list[int]:
        """Which service each of the next n prompts comes from."""
        return [random.Random(f"remote-{self.seed}-{k}").choices(range(len(self.services)), self.weights)[0]
                for k in range(self.position, self.position + n)]

    def sample(self, n: int) -> list[Prompt]:
        if not self.mixed:
            return self.services[0].sample(n)
        draws = self._draws(n)
        batches = {i: iter(self.services[i].sample(draws.count(i))) for i in sorted(set(draws))}
        prompts = [next(batches[i]) for i in draws]
        for i, p in zip(draws, prompts):
            p.meta["env"] = self.services[i].name
            p.meta["env_service"] = i
        self.position += n
        return prompts

    def eval_prompts(self, split: str, n: int) -> list[Prompt]:
        """A mix evaluates on its first service's held-out split."""
        try:
            out = self.services[0].call("POST", "/eval_prompts", {"split": split, "n": n})
        except EnvServiceError as exc:
            raise ValueError(f"eval.split={split!r} / eval.num_prompts={n}: {exc}") from exc
        prompts = [prompt_from_json(p) for p in out["prompts"]]
        if self.mixed:
            for p in prompts:
                p.meta["env"], p.meta["env_service"] = self.services[0].name, 0
        return prompts

    def score(self, prompts: list[Prompt], completions: list[list[str]]) -> Scores:
        if not self.mixed:
            return self.services[0].score(prompts, completions) or self._not_given(completions)
        out: list = [None] * len(prompts)
        for i, service in enumerate(self.services):
            rows = [r for r, p in enumerate(prompts) if p.meta["env_service"] == i]
            if not rows:
                continue
            scores = service.score([self._own(prompts[r]) for r in rows], [completions[r] for r in rows])
            if scores is None:
                for r in rows:
                    out[r] = [{"reward": None, "solved": None} for _ in completions[r]]
                continue
            weights = RewardWeights(service.info["reward_weights"])
            flat = [c for group in scores for c in group]
            solved = iter(service.success(flat))
            for r, group in zip(rows, scores):
                out[r] = [{"reward": _total(weights, c), "solved": float(next(solved))} for c in group]
        return out

    def _not_given(self, completions: list[list[str]]) -> Scores:
        return [[{name: None for name in self.reward_weights.names} for _ in group] for group in completions]

    @staticmethod
    def _own(prompt: Prompt) -> Prompt:
        """The prompt as its service made it (without the mix's tags)."""
        meta = {k: v for k, v in prompt.meta.items() if k not in ("env", "env_service")}
        return Prompt(prompt.messages, prompt.answer, meta)

    def success(self, components: Mapping[str, Optional[float]]) -> bool:
        if self.mixed:
            return components["solved"] == 1.0
        return self.services[0].success([components])[0]

    def corpus(self) -> Iterator[str]:
        for service in self.services:
            yield from service.call("GET", "/corpus")["texts"]

    def state_dict(self) -> dict:
        return {"position": self.position, "services": [s.state for s in self.services]}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]
        for service, s in zip(self.services, state["services"]):
            service.state = s
            service.restore()

    def close(self) -> None:
        for service in self.services:
            service.session.close()


def _total(weights: RewardWeights, components: Mapping[str, Optional[float]]) -> Optional[float]:
    """A service's weighted total; None if a weighted component is missing."""
    if any(components.get(n) is None for n, w in weights.weights.items() if w):
        return None
    return weights.total({n: components.get(n) for n in weights.names})
