"""Any Env over HTTP: the app `python -m envs.serve` runs, and what `env=remote` (envs/remote.py)
speaks to. Its routes are the Env protocol's methods, JSON in and out:

    GET  /health                    {"ok", "instance"}                    (open, no key)
    GET  /info                      {"name", "protocol", "reward_weights", "max_tokens", "max_turns",
                                     "instance", "initial_state", "multi_turn", and for a multi-turn
                                     env "max_total_tokens", "stop_tokens", "tools", "max_tool_chars"}
    POST /sample {n, instance}      {"prompts", "state"}    409 if `instance` is not this process
    POST /eval_prompts {split, n}   {"prompts"}             400 naming the key on a bad split / n
    POST /score {prompts, completions}  {"scores"}          NaN travels as null (not given); a
                                                            multi-turn env's completions are dialogues
    POST /episodes {prompt, seed}   {"id"}                  multi-turn envs (envs/episode.py)
    POST /episodes/{id}/step {turn, text}  {"messages", "done", "info"}   404: unknown id
    DELETE /episodes/{id}
    POST /success {components}      {"success"}             one bool per components dict
    GET  /corpus                    {"texts"}
    GET  /state, POST /state {state}

State lives in the trainer: every /sample answers the env's state after it, and the trainer saves
that in its checkpoints. A service that restarted (new `instance`) refuses /sample with 409 until
the trainer puts the state back (POST /state), so a restart loses only the requests in flight and a
resumed run samples what the uninterrupted one would. Episodes live here, by id
(envs/served_episodes.py): a step repeated for the same turn answers the same reply, and a restart
loses the episodes in flight (404), nothing else. One env object serves one run; its calls are
serialised by a lock (envs keep cursors). Every route but /health needs `Authorization: Bearer
<key>` when the service has a key (serving/auth.py), as our vLLM server does.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import uuid
from typing import Any, Optional, Union

from envs.episode import is_multi_turn
from envs.served_episodes import EpisodeTable, OutOfTurn, UnknownEpisode
from grpo.data import Prompt

PROTOCOL = 1  # bumped on any change a client of the previous version would misread
MULTI_TURN_KEYS = ("max_total_tokens", "stop_tokens", "tools", "max_tool_chars")  # a multi-turn env's /info


def prompt_to_json(prompt: Prompt) -> dict:
    return dataclasses.asdict(prompt)


def prompt_from_json(data: dict) -> Prompt:
    return Prompt(messages=data["messages"], answer=data["answer"], meta=data.get("meta") or {})


def _given(value: Optional[float]) -> Optional[float]:
    """JSON has no NaN: a value the env could not give travels as null either way."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def build_app(env: Any, name: str, api_key: Optional[str] = None):
    """The FastAPI app serving `env` (built from the config), named `name` in /info and errors."""
    from fastapi import Body, FastAPI, HTTPException

    from serving.auth import RequireApiKey

    app = FastAPI(title=f"grpo-lab env service: {name}")
    if api_key:
        app.add_middleware(RequireApiKey, key=api_key)
    lock, instance = threading.Lock(), uuid.uuid4().hex
    initial_state = env.state_dict()
    episodes = EpisodeTable()

    def bad_request(exc: Exception):
        return HTTPException(status_code=400, detail=f"env service {name!r}: {exc}")

    def parse(prompt: dict) -> Prompt:
        try:
            return prompt_from_json(prompt)
        except (KeyError, TypeError) as exc:
            raise bad_request(f"not a prompt: {exc}") from exc

    @app.get("/health")
    def health() -> dict:
        return {"ok": True, "instance": instance}

    @app.get("/info")
    def info() -> dict:
        out = {"name": name, "protocol": PROTOCOL, "reward_weights": env.reward_weights.weights,
               "max_tokens": env.max_tokens, "max_turns": getattr(env, "max_turns", 1), "instance": instance,
               "initial_state": initial_state, "multi_turn": is_multi_turn(env)}
        if out["multi_turn"]:  # what the trainer's episode loop reads of a local multi-turn env
            out.update({key: getattr(env, key) for key in MULTI_TURN_KEYS})
        return out

    @app.post("/sample")
    def sample(n: int = Body(..., ge=1), client_instance: Optional[str] = Body(None, alias="instance")) -> dict:
        if client_instance is not None and client_instance != instance:
            # this process is not the one the trainer's state came from: it must be restored first
            raise HTTPException(status_code=409, detail={"instance": instance})
        with lock:
            prompts = env.sample(n)
            return {"prompts": [prompt_to_json(p) for p in prompts], "state": env.state_dict()}

    @app.post("/eval_prompts")
    def eval_prompts(split: str = Body(...), n: int = Body(..., ge=1)) -> dict:
        with lock:
            try:
                return {"prompts": [prompt_to_json(p) for p in env.eval_prompts(split, n)]}
            except (ValueError, FileNotFoundError) as exc:
                raise bad_request(exc) from exc

    @app.post("/score")
    def score(prompts: list[dict] = Body(...), completions: list[list[Union[str, list[dict]]]] = Body(...)) -> dict:
        parsed = [parse(p) for p in prompts]
        with lock:
            try:
                scores = env.score(parsed, completions)
            except (ValueError, KeyError) as exc:
                raise bad_request(exc) from exc
        return {"scores": [[{k: _given(v) for k, v in s.items()} for s in group] for group in scores]}

    def episode_route(where: str, action):
        """`action()` under the lock; an unknown id is 404 (the client ends only that episode)."""
        with lock:
            try:
                return action()
            except UnknownEpisode as exc:
                raise HTTPException(status_code=404, detail=f"env service {name!r}: {where}: no live episode "
                                                            f"{exc.args[0]} (the service restarted?)") from exc
            except OutOfTurn as exc:
                raise bad_request(exc) from exc

    @app.post("/episodes")
    def start(prompt: dict = Body(...), seed: int = Body(...)) -> dict:
        if not is_multi_turn(env):
            raise bad_request("a single-turn env has no episodes")
        parsed = parse(prompt)
        with lock:
            return {"id": episodes.add(env.start(parsed, seed))}

    @app.post("/episodes/{episode_id}/step")
    def step(episode_id: str, turn: int = Body(..., ge=1), text: str = Body(...)) -> dict:
        return episode_route("step", lambda: episodes.step(episode_id, turn, text))

    @app.delete("/episodes/{episode_id}")
    def delete(episode_id: str) -> dict:
        return episode_route("delete", lambda: episodes.delete(episode_id)) or {}

    @app.post("/success")
    def success(components: list[dict[str, Optional[float]]] = Body(..., embed=True)) -> dict:
        return {"success": [bool(env.success(c)) for c in components]}

    @app.get("/corpus")
    def corpus() -> dict:
        with lock:
            return {"texts": list(env.corpus())}

    @app.get("/state")
    def get_state() -> dict:
        with lock:
            return {"state": env.state_dict(), "instance": instance}

    @app.post("/state")
    def set_state(state: dict = Body(..., embed=True)) -> dict:
        with lock:
            env.load_state_dict(state)
        return {"instance": instance}

    return app
