"""A tiny SMTP server in a thread that stands in for the internet in the sending tests.

The test node's Postfix relays every non-local message to it (``relayhost =
[127.0.0.1]:<port>``); it accepts everything and keeps each message as a ``Received``
(envelope sender, recipients, raw bytes with CRLF line ends, dot-unstuffed). Plain SMTP only:
it offers no STARTTLS, as Postfix's ``smtp_tls_security_level = may`` then sends in clear.
"""

from __future__ import annotations

import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Received:
    mail_from: str
    rcpt_to: list[str]
    data: bytes

    def header(self, name: str) -> str | None:
        """The first header ``name`` (unfolded), or None."""
        head = self.data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
        lines: list[str] = []
        for line in head.split("\r\n"):
            if line[:1] in (" ", "\t") and lines:
                lines[-1] += " " + line.strip()
            else:
                lines.append(line)
        for line in lines:
            key, colon, value = line.partition(":")
            if colon and key.strip().lower() == name.lower():
                return value.strip()
        return None


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def _say(self, line: str) -> None:
        self.wfile.write(line.encode("ascii") + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        self._say("220 sink.test ESMTP test sink")
        mail_from: str | None = None
        rcpts: list[str] = []
        while True:
            raw = self.rfile.readline(65536)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            verb = line[:4].upper()
            if verb in ("EHLO", "HELO"):
                self._say("250-sink.test" if verb == "EHLO" else "250 sink.test")
                if verb == "EHLO":
                    self._say("250-8BITMIME")
                    self._say("250 SIZE 52428800")
            elif line.upper().startswith("MAIL FROM:"):
                mail_from = line[10:].strip().split(" ")[0].strip("<>")
                rcpts = []
                self._say("250 2.1.0 Ok")
            elif line.upper().startswith("RCPT TO:"):
                rcpts.append(line[8:].strip().split(" ")[0].strip("<>"))
                self._say("250 2.1.5 Ok")
            elif verb == "DATA":
                if mail_from is None or not rcpts:
                    self._say("503 5.5.1 need MAIL and RCPT first")
                    continue
                self._say("354 End data with <CR><LF>.<CR><LF>")
                chunks: list[bytes] = []
                while True:
                    data_line = self.rfile.readline(1 << 20)
                    if not data_line or data_line in (b".\r\n", b".\n"):
                        break
                    if data_line.startswith(b".."):
                        data_line = data_line[1:]
                    chunks.append(data_line)
                self.server.sink.add(Received(mail_from, rcpts, b"".join(chunks)))
                mail_from, rcpts = None, []
                self._say("250 2.0.0 Ok: queued")
            elif verb == "RSET":
                mail_from, rcpts = None, []
                self._say("250 2.0.0 Ok")
            elif verb == "NOOP":
                self._say("250 2.0.0 Ok")
            elif verb == "QUIT":
                self._say("221 2.0.0 Bye")
                return
            else:
                self._say("502 5.5.2 command not recognized")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    sink: SmtpSink


class SmtpSink:
    """Start with ``SmtpSink()`` (binds 127.0.0.1 on a free port, serves in a daemon thread);
    ``messages`` holds what arrived; ``wait_for(pred)`` polls for one; ``close()`` stops it."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._server = _Server((host, 0), _Handler)
        self._server.sink = self
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="smtp-sink", daemon=True)
        self._thread.start()

    def add(self, message: Received) -> None:
        with self._lock:
            self.messages.append(message)

    def wait_for(
        self, pred: Callable[[Received], bool], timeout: float = 20.0, on_timeout: Callable[[], str] | None = None
    ) -> Received:
        """The first message ``pred`` accepts, waiting up to ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                for m in self.messages:
                    if pred(m):
                        return m
            if time.monotonic() > deadline:
                extra = on_timeout() if on_timeout else ""
                raise AssertionError(
                    f"no matching message at the sink after {timeout}s ({len(self.messages)} received)\n{extra}"
                )
            time.sleep(0.05)

    def wait_subject(
        self, subject: str, timeout: float = 20.0, on_timeout: Callable[[], str] | None = None
    ) -> Received:
        return self.wait_for(lambda m: m.header("Subject") == subject, timeout, on_timeout)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
