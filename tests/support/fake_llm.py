"""A real local HTTP server speaking the OpenAI Chat Completions / Completions protocol.

Tests (the planner's and the service's) point the real ``openai`` client at it. It serves a
queue of canned replies and injected faults, records every request it gets, and answers a
default layout when the queue is empty::

    def test_something(fake_llm):
        fake_llm.enqueue(layout)                     # a Layout, a dict, or raw answer text
        fake_llm.enqueue_status(429, retry_after=1)  # then 500s, timeouts, malformed bodies...
        planner = Planner(fake_llm.config())         # LLMConfig with small timeouts/backoff
        ...
        assert len(fake_llm.requests) == 2

Faults: ``enqueue_status`` (any HTTP error, optional Retry-After), ``enqueue_timeout``
(sleeps past the client timeout), ``enqueue_malformed`` (200 with a body that is not JSON),
``enqueue_empty`` (an empty answer), ``enqueue_truncated`` (half a layout, finish_reason
"length"). ``reject_response_format = True`` answers 400 to any request carrying
``response_format`` (an endpoint without structured output); ``reject_params[name] = message``
answers 400 with ``message`` to any request carrying the field ``name``.

Outside the tests (``scripts/compose-check`` points a docker compose stack at it)::

    python -m tests.support.fake_llm --port 8088     # serves the default layout until SIGTERM
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

DEFAULT_REPLY = json.dumps(
    {
        "objects": [{"id": "cat", "phrase": "a cat", "box": [64, 128, 192, 256]}],
        "background": "a realistic living room",
        "negative": "",
    }
)


@dataclass
class FakeReply:
    kind: str = "text"  # text | status | timeout | malformed
    text: str = ""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    finish_reason: str = "stop"


@dataclass
class RecordedRequest:
    path: str
    body: dict[str, Any] | None
    headers: dict[str, str]
    time: float

    @property
    def messages(self) -> list[dict[str, str]]:
        return (self.body or {}).get("messages", [])

    @property
    def last_user_content(self) -> str:
        users = [m["content"] for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else (self.body or {}).get("prompt", "")


class FakeLLM:
    """The server and its controls; ``base_url`` ends in ``/v1`` like OpenAI's."""

    def __init__(self, port: int = 0) -> None:
        self.replies: deque[FakeReply] = deque()
        self.requests: list[RecordedRequest] = []
        self.default_reply: str | None = DEFAULT_REPLY  # None: an empty queue answers 500
        self.reject_response_format = False
        # Request fields answered with a 400 and this message (a reasoning model refusing max_tokens...).
        self.reject_params: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-llm", daemon=True
        )
        self._thread.start()

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    # --- queue ---------------------------------------------------------------------------

    def enqueue(self, reply: Any, finish_reason: str = "stop") -> None:
        """Queue one answer: a ``Layout`` (sent as its LLM JSON), a dict (JSON), or raw text."""
        if hasattr(reply, "to_llm_json"):
            reply = reply.to_llm_json()
        elif not isinstance(reply, str):
            reply = json.dumps(reply)
        self.replies.append(FakeReply(text=reply, finish_reason=finish_reason))

    def enqueue_status(self, status: int, message: str = "injected fault", retry_after: float | str | None = None) -> None:
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        self.replies.append(FakeReply(kind="status", status=status, text=message, headers=headers))

    def enqueue_timeout(self, delay_s: float = 2.0) -> None:
        """Hold the request ``delay_s`` before answering (make it longer than the client timeout)."""
        self.replies.append(FakeReply(kind="timeout", delay_s=delay_s, text=self.default_reply or DEFAULT_REPLY))

    def enqueue_malformed(self) -> None:
        self.replies.append(FakeReply(kind="malformed"))

    def enqueue_empty(self) -> None:
        self.replies.append(FakeReply(text=""))

    def enqueue_truncated(self, text: str | None = None) -> None:
        full = text or DEFAULT_REPLY
        self.replies.append(FakeReply(text=full[: len(full) // 2], finish_reason="length"))

    # --- helpers -------------------------------------------------------------------------

    def config(self, **overrides: Any):
        """An ``LLMConfig`` for this server with test-sized timeouts and backoff."""
        from layout_planner import LLMConfig

        values = dict(
            base_url=self.base_url,
            model="fake-model",
            api_key="test-key",
            timeout_s=0.5,
            backoff_s=0.01,
            max_backoff_s=0.05,
            max_retry_after_s=0.05,
        )
        values.update(overrides)
        return LLMConfig(**values)

    def env(self) -> dict[str, str]:
        """``LMD_LLM_*`` environment variables pointing ``lmd.settings`` at this server."""
        return {
            "LMD_LLM_BASE_URL": self.base_url,
            "LMD_LLM_MODEL": "fake-model",
            "LMD_LLM_API_KEY": "test-key",
            "LMD_LLM_TIMEOUT_S": "0.5",
            "LMD_LLM_BACKOFF_S": "0.01",
        }

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _next(self, body: dict[str, Any] | None, path: str, headers: dict[str, str]) -> FakeReply:
        with self._lock:
            self.requests.append(RecordedRequest(path=path, body=body, headers=headers, time=time.monotonic()))
            if self.reject_response_format and body and "response_format" in body:
                return FakeReply(kind="status", status=400, text="response_format is not supported by this server")
            refused = [name for name in self.reject_params if body and name in body]
            if refused:
                return FakeReply(kind="status", status=400, text=self.reject_params[refused[0]])
            if self.replies:
                return self.replies.popleft()
        if self.default_reply is None:
            return FakeReply(kind="status", status=500, text="no canned reply queued")
        return FakeReply(text=self.default_reply)


def _handler_for(fake: FakeLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except json.JSONDecodeError:
                body = None
            path = self.path.split("?")[0]
            reply = fake._next(body, path, {k.lower(): v for k, v in self.headers.items()})
            if reply.kind == "timeout":
                if fake._stop.wait(reply.delay_s):
                    return
            if path.endswith("/chat/completions"):
                kind = "chat"
            elif path.endswith("/completions"):
                kind = "text"
            else:
                self._send(404, {"error": {"message": f"unknown path {path}", "type": "not_found"}})
                return
            if reply.kind == "status":
                error = {"error": {"message": reply.text, "type": "fake_error", "code": reply.status}}
                self._send(reply.status, error, reply.headers)
                return
            if reply.kind == "malformed":
                self._send_raw(200, b'{"id": "broken", "choices": [', "application/json")
                return
            self._send(200, _completion(kind, reply, (body or {}).get("model", "fake-model")))

        def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            self._send_raw(status, json.dumps(payload).encode(), "application/json", headers)

        def _send_raw(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test)

    return Handler


def _completion(kind: str, reply: FakeReply, model: str) -> dict[str, Any]:
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    if kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": reply.text},
            "finish_reason": reply.finish_reason,
        }
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model, "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": reply.text, "finish_reason": reply.finish_reason, "logprobs": None}
    return {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": model, "choices": [choice], "usage": usage}


@pytest.fixture
def fake_llm():
    """A fresh fake OpenAI-compatible server per test; see the module docstring."""
    server = FakeLLM()
    try:
        yield server
    finally:
        server.close()


def main() -> None:
    """Serve the default layout on a loopback port until SIGTERM or SIGINT."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description="a fake OpenAI-compatible server on 127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = FakeLLM(port=args.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"fake LLM at {server.base_url}", flush=True)
    stop.wait()
    server.close()


if __name__ == "__main__":
    main()
