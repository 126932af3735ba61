"""Every bridge resets vLLM's prefix cache through one check, `VLLMServer.reset_prefix_cache`:
vLLM refuses (`{"success": false}`) while KV blocks are held; the check asks again, then stops
the sync. Shown against the real server (a request frozen by `/pause?mode=keep` holds its blocks)
through the reload bridge, and its retry count against a loopback server of our own that answers
as vLLM's route does."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from bridges.reload import ReloadBridge
from conftest import PROBE_TOL, perturb, restore_pristine
from grpo.policy import Policy
from serving.client import VLLMClient
from serving.server import PrefixCacheError, VLLMServer


@pytest.fixture
def answering():
    """A loopback server whose /reset_prefix_cache answers `replies` in turn (the last repeats)."""
    replies, asked = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            asked.append(self.path)
            body = json.dumps({"success": replies[min(len(asked), len(replies)) - 1]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    server = VLLMServer("unused", args=[], env={}, log_path=None, base_url=f"http://127.0.0.1:{httpd.server_port}")
    try:
        yield server, replies, asked
    finally:
        httpd.shutdown()


def test_a_refused_reset_is_asked_again_then_stops(answering):
    server, replies, asked = answering
    replies[:] = [False, False, True]
    server.reset_prefix_cache(attempts=3, wait_s=0.01)
    assert asked == ["/reset_prefix_cache"] * 3

    asked.clear()
    replies[:] = [False]
    with pytest.raises(PrefixCacheError, match="refused to reset its prefix cache 4 times"):
        server.reset_prefix_cache(attempts=4, wait_s=0.01)
    assert len(asked) == 4


@pytest.mark.slow
def test_reload_stops_when_vllm_keeps_its_prefix_cache(vllm_server, tiny_model_path, tmp_path):
    policy = Policy(tiny_model_path)
    bridge = ReloadBridge(probe_tolerance=PROBE_TOL)
    bridge.setup(policy, vllm_server, VLLMClient(vllm_server, "policy"), tmp_path)
    bridge.ensure_synced()
    perturb(policy)
    # A long request, frozen mid-generation: its KV blocks stay held until it resumes.
    stream = requests.post(f"{vllm_server.base_url}/v1/completions", stream=True, timeout=300, json={
        "model": "policy", "prompt": bridge.probe_ids, "max_tokens": 600, "ignore_eos": True, "stream": True})
    lines = stream.iter_lines()
    assert next(line for line in lines if line.startswith(b"data: "))  # generating
    vllm_server.post("/pause?mode=keep&clear_cache=false")
    try:
        with pytest.raises(PrefixCacheError, match="blocks still held"):
            bridge.sync(step=1)
    finally:
        vllm_server.post("/resume")
    try:
        assert sum(1 for line in lines if line.startswith(b"data: ")) > 100  # the request ran on
        stats = bridge.sync(step=1)  # nothing held now: the reset goes through
        assert stats.probe_max_diff <= PROBE_TOL
    finally:
        bridge.close()
        restore_pristine(vllm_server, tiny_model_path)
