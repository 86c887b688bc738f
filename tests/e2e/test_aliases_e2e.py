"""Aliases through the whole pipeline: `mailstate serve` → signed commits → pi-pull ticks →
REAL Postfix and Dovecot on loopback, checked with smtplib and imaplib.

External destinations: the test node's Postfix relays every non-local domain to a small
SMTP sink on loopback (`relayhost = [127.0.0.1]:<port>`), which stands in for the internet:
it accepts every message and records the envelope recipients, so a test can see what left
the node. Nothing else is faked.
"""

from __future__ import annotations

import contextlib
import imaplib
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.helpers.fleet import P1, Fleet
from tests.helpers.mailnode import MailNode, free_ports
from tests.helpers.pipull import EXIT_OK

pytestmark = pytest.mark.e2e


# --------------------------------------------------------------------------- the internet


@dataclass
class Sink:
    """A minimal SMTP server that accepts everything: the stand-in for the internet."""

    port: int
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def received(self, rcpt: str, subject: str) -> int:
        with self.lock:
            return sum(
                1 for _, rcpts, data in self.messages if rcpt in rcpts and f"Subject: {subject}".encode() in data
            )

    def wait(self, rcpt: str, subject: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.received(rcpt, subject):
            if time.monotonic() > deadline:
                raise AssertionError(f"the sink got no {subject!r} for {rcpt}: {[(m[0], m[1]) for m in self.messages]}")
            time.sleep(0.1)


def _handler(sink: Sink) -> type[socketserver.StreamRequestHandler]:
    class Handler(socketserver.StreamRequestHandler):
        def reply(self, text: str) -> None:
            self.wfile.write(text.encode() + b"\r\n")

        def handle(self) -> None:
            self.reply("220 internet.test ESMTP sink")
            sender, rcpts = "", []
            while True:
                line = self.rfile.readline()
                if not line:
                    return
                cmd = line.decode(errors="replace").strip()
                verb = cmd[:4].upper()
                if verb in ("EHLO", "HELO"):
                    self.reply("250 internet.test")
                elif verb == "MAIL":
                    sender, rcpts = cmd.partition(":")[2].strip(" <>"), []
                    self.reply("250 ok")
                elif verb == "RCPT":
                    rcpts.append(cmd.partition(":")[2].strip().strip("<>").split(">")[0])
                    self.reply("250 ok")
                elif verb == "DATA":
                    self.reply("354 go ahead")
                    data = b""
                    while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                        data += chunk
                    with sink.lock:
                        sink.messages.append((sender, rcpts, data))
                    self.reply("250 queued")
                elif verb == "QUIT":
                    self.reply("221 bye")
                    return
                else:  # RSET, NOOP, ...
                    self.reply("250 ok")

    return Handler


@contextlib.contextmanager
def internet(node: MailNode) -> Iterator[Sink]:
    """Start the sink and point the node's Postfix at it for every non-local domain."""
    sink = Sink(port=free_ports(1)[0])
    server = socketserver.ThreadingTCPServer(("127.0.0.1", sink.port), _handler(sink))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    conf = ["-c", str(node.postfix_dir)]
    subprocess.run(
        ["postconf", *conf, "-e", f"relayhost = [127.0.0.1]:{sink.port}", "smtp_tls_security_level = none"], check=True
    )
    subprocess.run(["postfix", *conf, "reload"], check=True, capture_output=True)
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- helpers


def count(node: MailNode, user: str, subject: str) -> int:
    m = node.imap(user, P1)
    try:
        m.select("INBOX")
        typ, data = m.search(None, "SUBJECT", f'"{subject}"')
        return len(data[0].split()) if typ == "OK" and data and data[0] else 0
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            m.logout()


def queue_empty(node: MailNode, timeout: float = 20.0) -> None:
    """Wait until Postfix has delivered (or bounced) everything: then a count of 0 means 'not delivered'."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(["postqueue", "-c", str(node.postfix_dir), "-p"], capture_output=True, text=True).stdout
        if "Mail queue is empty" in out:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the queue did not drain: {out}\n{node.postfix_log()[-2000:]}")
        time.sleep(0.1)


def apply(f: Fleet) -> None:
    r = f.tick()
    assert r.returncode == EXIT_OK, r.stderr


def mailboxes(f: Fleet, domain: str, *locals_: str) -> None:
    f.call(f.admin, "link-domain", {"domain": domain, "project_id": 42}, status=201)
    f.call(f.project, "enable-email", {"domain": domain})
    for local in locals_:
        f.call(f.project, "add-user", {"email": f"{local}@{domain}", "password": P1}, status=201)


# --------------------------------------------------------------------------- the tests


def test_aliases_catch_all_alias_domain_through_real_postfix(fleet: Fleet) -> None:
    f, node = fleet, fleet.node
    mailboxes(f, "example.com", "info", "anna", "bob")
    with internet(node) as sink:
        # An alias to two mailboxes: both get the message. And one to the internet.
        f.call(
            f.project,
            "add-alias",
            {"address": "team@example.com", "destinations": ["info@example.com", "anna@example.com"]},
            status=201,
        )
        f.call(
            f.project,
            "add-alias",
            {"address": "ext@example.com", "destinations": ["someone@internet.test"]},
            status=201,
        )
        apply(f)
        node.send("team@example.com", "to-the-team")
        node.wait_for_message("info@example.com", P1, "to-the-team")
        node.wait_for_message("anna@example.com", P1, "to-the-team")
        node.send("ext@example.com", "to-the-internet")
        sink.wait("someone@internet.test", "to-the-internet")

        # A catch-all beside existing mailboxes: each mailbox still gets its own mail, an
        # alias still beats the catch-all, and only unknown addresses reach the catch-all.
        f.call(f.project, "add-alias", {"address": "@example.com", "destinations": ["anna@example.com"]}, status=201)
        apply(f)
        node.send("info@example.com", "own-mail")
        node.send("nobody@example.com", "to-nobody")
        node.send("ext@example.com", "alias-beats-catch-all")
        node.wait_for_message("info@example.com", P1, "own-mail")
        node.wait_for_message("anna@example.com", P1, "to-nobody")
        sink.wait("someone@internet.test", "alias-beats-catch-all")
        queue_empty(node)
        assert count(node, "anna@example.com", "own-mail") == 0
        assert count(node, "anna@example.com", "alias-beats-catch-all") == 0

        # An alias domain: x@old.example goes to x@example.com.
        mailboxes(f, "old.example")
        f.call(f.project, "add-alias-domain", {"domain": "old.example", "target": "example.com"})
        apply(f)
        node.send("bob@old.example", "via-the-old-domain")
        node.wait_for_message("bob@example.com", P1, "via-the-old-domain")

        # Forwarding with a copy, then without.
        f.call(f.project, "set-forwarding", {"email": "bob@example.com", "destinations": ["bob@internet.test"]})
        apply(f)
        node.send("bob@example.com", "forward-with-copy")
        sink.wait("bob@internet.test", "forward-with-copy")
        node.wait_for_message("bob@example.com", P1, "forward-with-copy")
        f.call(
            f.project,
            "set-forwarding",
            {"email": "bob@example.com", "destinations": ["bob@internet.test"], "keep_copy": False},
        )
        apply(f)
        node.send("bob@example.com", "forward-only")
        sink.wait("bob@internet.test", "forward-only")
        queue_empty(node)
        assert count(node, "bob@example.com", "forward-only") == 0
        assert count(node, "anna@example.com", "forward-only") == 0  # not the catch-all's either

        # update-alias takes effect after a tick: the team is now bob alone (who forwards).
        f.call(f.project, "update-alias", {"address": "team@example.com", "destinations": ["info@example.com"]})
        apply(f)
        node.send("team@example.com", "updated-team")
        node.wait_for_message("info@example.com", P1, "updated-team")
        queue_empty(node)
        assert count(node, "anna@example.com", "updated-team") == 0

        # remove-alias: the address falls to the catch-all; without the catch-all, 550.
        f.call(f.project, "remove-alias", {"address": "team@example.com"})
        apply(f)
        node.send("team@example.com", "removed-team")
        node.wait_for_message("anna@example.com", P1, "removed-team")
        f.call(f.project, "remove-alias-domain", {"domain": "old.example"})
        f.call(f.project, "remove-alias", {"address": "@example.com"})
        apply(f)
        assert node.rcpt_code("team@example.com")[0] == 550
        assert node.rcpt_code("bob@old.example")[0] == 550
        assert node.rcpt_code("info@example.com")[0] == 250

        # A soft-deleted mailbox loses its forwarding: 550, and nothing leaves the node.
        f.call(
            f.project,
            "set-forwarding",
            {"email": "anna@example.com", "destinations": ["anna@internet.test"], "keep_copy": False},
        )
        f.call(f.project, "remove-user", {"email": "anna@example.com"})
        apply(f)
        assert node.rcpt_code("anna@example.com")[0] == 550
        assert sink.received("anna@internet.test", "") == 0
