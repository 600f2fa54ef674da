"""The vLLM client's error classes: a server going away (its engine dead while it shuts down, or a Service
with no ready backend) is `ServerUnreachable`, which the GRPO rollouts wait out; a request the server
rejects is a plain `StageError`, which fails at once."""

from __future__ import annotations

import http.server
import threading

import pytest

from trainer.errors import StageError
from trainer.serve.vllm_server import ServerUnreachable, post

# What vLLM 0.32's API server answered an in-flight completion while SIGTERM stopped its engine core.
ENGINE_DEAD = ('{"error":{"message":"EngineCore encountered an issue. See stack trace (above) for the root '
               'cause.","type":"InternalServerError","param":null,"code":500}}')


@pytest.fixture
def answering():
    """A server on 127.0.0.1 that answers every POST with the (status, body) set on it."""
    reply = {"status": 200, "body": "{}"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(reply["status"])
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply["body"].encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield reply, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize(("status", "body"), [(500, ENGINE_DEAD), (503, "Service Unavailable"),
                                              (502, "Bad Gateway"), (504, "Gateway Timeout")])
def test_a_server_going_away_is_unreachable(answering, status, body):
    reply, url = answering
    reply.update(status=status, body=body)
    with pytest.raises(ServerUnreachable, match=f"going away: vLLM /v1/completions: HTTP {status}"):
        post(url, "/v1/completions", {"prompt": [1]})


@pytest.mark.parametrize(("status", "body"), [(400, '{"error": "max_tokens must be at least 1"}'),
                                              (500, '{"error": "some other internal error"}')])
def test_a_rejected_request_is_a_plain_stage_error(answering, status, body):
    reply, url = answering
    reply.update(status=status, body=body)
    with pytest.raises(StageError, match=f"HTTP {status}") as err:
        post(url, "/v1/completions", {"prompt": [1]})
    assert not isinstance(err.value, ServerUnreachable)
