"""Any Env over HTTP: the app `python -m envs.serve` runs, and what `env=remote` (envs/remote.py)
speaks to. Its routes are the Env protocol's methods, JSON in and out:

    GET  /health                    {"ok", "instance"}                    (open, no key)
    GET  /info                      {"name", "protocol", "reward_weights", "max_tokens", "max_turns",
                                     "instance", "initial_state"}
    POST /sample {n, instance}      {"prompts", "state"}    409 if `instance` is not this process
    POST /eval_prompts {split, n}   {"prompts"}             400 naming the key on a bad split / n
    POST /score {prompts, completions}  {"scores"}          NaN travels as null (not given)
    POST /success {components}      {"success"}             one bool per components dict
    GET  /corpus                    {"texts"}
    GET  /state, POST /state {state}

State lives in the trainer: every /sample answers the env's state after it, and the trainer saves
that in its checkpoints. A service that restarted (new `instance`) refuses /sample with 409 until
the trainer puts the state back (POST /state), so a restart loses only the requests in flight and a
resumed run samples what the uninterrupted one would. One env object serves one run; its calls are
serialised by a lock (envs keep cursors). Every route but /health needs `Authorization: Bearer
<key>` when the service has a key (serving/auth.py), as our vLLM server does.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import uuid
from typing import Any, Optional

from grpo.data import Prompt

PROTOCOL = 1  # bumped on any change a client of the previous version would misread


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

    def bad_request(exc: Exception):
        return HTTPException(status_code=400, detail=f"env service {name!r}: {exc}")

    @app.get("/health")
    def health() -> dict:
        return {"ok": True, "instance": instance}

    @app.get("/info")
    def info() -> dict:
        return {"name": name, "protocol": PROTOCOL, "reward_weights": env.reward_weights.weights,
                "max_tokens": env.max_tokens,
                "max_turns": getattr(env, "max_turns", 1), "instance": instance, "initial_state": initial_state}

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
    def score(prompts: list[dict] = Body(...), completions: list[list[str]] = Body(...)) -> dict:
        try:
            parsed = [prompt_from_json(p) for p in prompts]
        except (KeyError, TypeError) as exc:
            raise bad_request(f"not a prompt: {exc}") from exc
        with lock:
            try:
                scores = env.score(parsed, completions)
            except (ValueError, KeyError) as exc:
                raise bad_request(exc) from exc
        return {"scores": [[{k: _given(v) for k, v in s.items()} for s in group] for group in scores]}

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
