"""A real HTTP webhook receiver on loopback for the tests: it records every request (headers and
raw body), verifies Standard Webhooks signatures with the secret it is given, and answers what
the test says (a status per request, or a hang)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mailstate.state.webhooks import verify


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int  # what the sink answered
    at: float

    @property
    def id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def event(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data

    def verifies(self, secret: str) -> bool:
        h = self.headers
        return verify(secret, h["webhook-id"], h["webhook-timestamp"], self.body, h["webhook-signature"])


@dataclass
class WebhookSink:
    port: int = 0
    # request number (1-based) -> the status to answer; default 200. A hang: answer() sleeps.
    answer: Callable[[int], int] = lambda n: 200
    hang: float = 0.0
    received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> WebhookSink:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True  # a small answer: no Nagle wait (as a real server sets)
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with sink._lock:
                    n = len(sink.received) + 1
                    status = sink.answer(n)
                    sink.received.append(
                        Received({k.lower(): v for k, v in self.headers.items()}, body, status, time.time())
                    )
                if sink.hang:
                    time.sleep(sink.hang)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def do_GET(self) -> None:  # how many it got (a sink in another process, bench/bench_controls.py)
                with sink._lock:
                    body = json.dumps({"received": len(sink.received)}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def of_type(self, event_type: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.event["type"] == event_type]

    def wait(self, pred: Callable[[list[Received]], bool], timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                got = list(self.received)
            if pred(got):
                return got
            time.sleep(0.05)
        with self._lock:
            types = [r.event.get("type") for r in self.received]
        raise AssertionError(f"the webhook sink did not get what was expected within {timeout}s; it got {types}")


@contextmanager
def webhook_sink(**kwargs: Any) -> Iterator[WebhookSink]:
    sink = WebhookSink(**kwargs).start()
    try:
        yield sink
    finally:
        sink.stop()


if __name__ == "__main__":  # `python -m tests.helpers.webhooksink PORT`: a sink in its own process
    import sys

    server = WebhookSink(port=int(sys.argv[1])).start()
    threading.Event().wait()
