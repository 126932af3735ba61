"""A pooled keep-alive connection the server closed while idle (vLLM's HTTP keep-alive timeout is
5 s; a multi-turn step's train phase is longer) is retried once on a fresh connection; a server
that is not listening still fails at once."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler

import pytest

from conftest import loopback_http
from serving.server import VLLMRequestError, VLLMServer


class DropsKeptConnections(BaseHTTPRequestHandler):
    """Answers the first request of a connection and keeps it open (HTTP/1.1 keep-alive); a second
    request on it finds it closed without an answer: vLLM's idle timeout firing as the client sends."""

    protocol_version = "HTTP/1.1"
    release = threading.Event()
    dropped = 0

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if getattr(self, "answered", False):
            DropsKeptConnections.dropped += 1
            self.close_connection = True
            return
        self.answered = True
        self.send_response(200)
        self.send_header("Content-Length", "2")  # plain text: `post` gives it back as it is
        self.end_headers()
        self.wfile.write(b"ok")

    log_message = lambda self, *args: None  # noqa: E731  (quiet)


def test_a_request_on_a_connection_the_server_dropped_is_sent_again():
    with loopback_http(DropsKeptConnections) as url:
        server = VLLMServer("m", args=[], env={}, log_path=None, base_url=url)
        assert [server.post("/v1/completions", {"i": i}) for i in range(3)] == ["ok"] * 3
    assert DropsKeptConnections.dropped == 2  # requests 2 and 3 met a dropped connection first


def test_a_server_that_is_not_listening_fails_at_once():
    server = VLLMServer("m", args=[], env={}, log_path=None, base_url="http://127.0.0.1:9")
    with pytest.raises(VLLMRequestError, match="failed"):
        server.post("/v1/completions", {})
