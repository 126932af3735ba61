"""Every route but /health requires the API key (vLLM `--middleware serving.auth.RequireApiKey`).

vLLM's own `--api-key` guards only `/v1`, `/v2`, `/inference` and `/cohere`: with dev mode on,
`/collective_rpc` (any worker method, ours included), `/pause`, `/reset_prefix_cache` and the
weight-transfer routes answer anyone. This pure ASGI middleware runs in vLLM's API server and
answers 401 to any request without `Authorization: Bearer <key>`; /health stays open for load
balancers and our own start-up wait. The key comes from `VLLM_API_KEY` (VLLMServer sets it, so it
never appears on a command line); without one the server refuses to start, so a server started
with this middleware is never left open by mistake.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

OPEN_PATHS = ("/health",)


class RequireApiKey:
    def __init__(self, app, key: str | None = None):  # key: given by an app of ours (envs/service.py)
        key = key or os.environ.get("VLLM_API_KEY")
        if not key:
            raise RuntimeError("serving.auth.RequireApiKey needs the key in VLLM_API_KEY")
        self.app = app
        self.digest = hashlib.sha256(key.encode()).digest()

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        value = dict(headers).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        # Compare digests: equal length, constant time, whatever was sent.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            hashlib.sha256(token.encode()).digest(), self.digest)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):  # lifespan events carry no request
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if path in OPEN_PATHS or self.authorized(scope["headers"]):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = json.dumps({"error": "Unauthorized: set server.api_key to the server's key"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
