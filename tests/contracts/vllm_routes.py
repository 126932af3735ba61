"""vLLM's real HTTP routes (weight transfer, prefix cache, collective_rpc) served on loopback, with
an engine that records what reaches it: our requests go through vLLM's own FastAPI request
models, so a renamed route or body field fails here, on CPU."""

from __future__ import annotations

import threading
from contextlib import contextmanager
import time
from pathlib import Path
from types import SimpleNamespace

import uvicorn
from fastapi import FastAPI
from vllm.entrypoints.rl.online.api_router import router as rl_router
from vllm.entrypoints.serve.dev.cache.api_router import router as cache_router
from vllm.entrypoints.serve.dev.rpc.api_router import router as rpc_router

from serving.server import VLLMServer, free_port


class RecordingEngine:
    """The engine client behind the routes (vLLM's AsyncLLM in a real server): it records each
    call with what the route built from our JSON, and answers like a server with `world_size`
    workers."""

    def __init__(self, world_size: int = 3):
        self.calls: list[tuple[str, object]] = []
        self.vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(world_size_across_dp=world_size,
                                                                            world_size=world_size))
        self.rpc_results: list = [None]

    async def init_weight_transfer_engine(self, request):
        self.calls.append(("init_weight_transfer_engine", request))

    async def start_weight_update(self):
        self.calls.append(("start_weight_update", None))

    async def update_weights(self, request):
        self.calls.append(("update_weights", request))

    async def finish_weight_update(self, weight_version=None):
        self.calls.append(("finish_weight_update", weight_version))

    async def shutdown_weight_transfer_engine(self):
        self.calls.append(("shutdown_weight_transfer_engine", None))

    async def reset_prefix_cache(self, reset_running_requests=False, reset_external=False):
        self.calls.append(("reset_prefix_cache", None))
        return True

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(("collective_rpc", {"method": method, "kwargs": kwargs}))
        return self.rpc_results


def serve_routes(engine: RecordingEngine):
    """(VLLMServer attached to the routes, stop function)."""
    app = FastAPI()
    for router in (rl_router, cache_router, rpc_router):
        app.include_router(router)
    app.state.engine_client = engine
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(10)

    attached = VLLMServer("contract", args=[], env={}, log_path=Path("/dev/null"), base_url=f"http://127.0.0.1:{port}")
    return attached, stop


@contextmanager
def running_routes(world_size: int):
    """(attached VLLMServer, RecordingEngine) of vLLM's real routes over an engine with
    `world_size` workers; stopped on leaving."""
    engine = RecordingEngine(world_size=world_size)
    server, stop = serve_routes(engine)
    try:
        yield server, engine
    finally:
        stop()
