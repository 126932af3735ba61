"""`POST /generate` on our vLLM server (vLLM `--middleware serving.atropos_generate.AtroposGenerate`):
the native route Atropos environments with `server_type: vllm` call, which current vLLM no longer
has. Token ids in, text, token ids and sampled logprobs out:

    {"prompt": {"prompt_token_ids": [...]}, "logprobs": 0, "n": 4, "max_tokens": 16, ...}
    -> {"text": [...], "token_ids": [[...]], "logprobs": [[[{"<id>": lp}], ...]], "finish_reasons": [...]}

It is answered by the engine's own `/v1/completions` route (called inside the process, through
the app below this middleware), so generation, sampling parameters and logprobs (processed, with
temperature, as our rollouts get them) are exactly our client's. Atropos envs name no model we
serve, so the trainer says which one /generate samples from (`POST /atropos/generate_model
{"model"}`: its rollout client's, the LoRA adapter with mode/lora_sync=adapter), before each batch
it pulls (envs/atropos.py): every bridge keeps the env's generations on the trainer's weights.
"""

from __future__ import annotations

import asyncio
import json

SAMPLING_KEYS = ("n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                 "ignore_eos", "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty")


def completions_request(body: dict, model: str | None) -> dict:
    """The /v1/completions payload for an Atropos /generate body."""
    prompt = body.get("prompt")
    ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
    if not isinstance(ids, list):
        raise ValueError("/generate needs prompt.prompt_token_ids (a list of token ids)")
    payload = {k: body[k] for k in SAMPLING_KEYS if k in body}
    payload.update(prompt=ids, logprobs=0, return_token_ids=True)
    if "max_new_tokens" in body:
        payload["max_tokens"] = body["max_new_tokens"]
    if model:
        payload["model"] = model
    return payload


def generate_response(completions: dict) -> dict:
    """Atropos' /generate answer from a /v1/completions answer (choices in index order)."""
    choices = sorted(completions["choices"], key=lambda c: c["index"])
    return {"text": [c["text"] for c in choices],
            "token_ids": [list(c["token_ids"]) for c in choices],
            "logprobs": [[[{str(t): lp}] for t, lp in zip(c["token_ids"], c["logprobs"]["token_logprobs"])]
                         for c in choices],
            "finish_reasons": [c["finish_reason"] for c in choices]}


async def _read(receive) -> bytes:
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


class AtroposGenerate:
    def __init__(self, app):
        self.app = app
        self.model: str | None = None  # what /generate samples from; None: the server's own model

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if path == "/generate":
            return await self.generate(scope, receive, send)
        if path == "/atropos/generate_model":
            self.model = json.loads(await _read(receive)).get("model")
            return await _send(send, 200, json.dumps({"model": self.model}).encode())
        return await self.app(scope, receive, send)

    async def generate(self, scope, receive, send):
        try:
            payload = completions_request(json.loads(await _read(receive)), self.model)
        except (ValueError, AttributeError) as exc:
            return await _send(send, 400, json.dumps({"error": str(exc)}).encode())
        status, answer = await self.inner(scope, "/v1/completions", json.dumps(payload).encode())
        if status != 200:
            return await _send(send, status, answer)
        return await _send(send, 200, json.dumps(generate_response(json.loads(answer))).encode())

    async def inner(self, scope, path: str, body: bytes) -> tuple[int, bytes]:
        """POST `body` to `path` of the app below us; its status and whole answer."""
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        sub = {**scope, "path": path, "raw_path": path.encode(), "query_string": b"", "headers": headers}
        sent = False
        status, chunks = 500, []

        async def receive():
            nonlocal sent
            if sent:  # vLLM watches for a disconnect to cancel the request: there is none
                await asyncio.Event().wait()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(sub, receive, capture)
        return status, b"".join(chunks)


async def _send(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
