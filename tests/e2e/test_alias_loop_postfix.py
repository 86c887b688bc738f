"""What mail does on an alias loop that two projects build together on purpose: real Postfix and
Dovecot with the bundle's default map layout, fed by `mailstate serve` and pi-pull.

The rule that lets each half through (a chain ends where it enters another project's domain):
tests/state/test_alias_scope.py.
"""

from __future__ import annotations

import contextlib
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from mailstate.compiler.node_bundle import DEFAULT_MAP_BUCKETS
from tests.helpers.common import PASSWORD
from tests.helpers.fleet import provision_node, start_server_for
from tests.helpers.mailnode import MailNode, run_pi_pull, running_mailnode

pytestmark = pytest.mark.e2e

API = "/v1/email-account"


def _queue_empty(node: MailNode) -> bool:
    out = subprocess.run(["postqueue", "-c", str(node.postfix_dir), "-p"], capture_output=True, text=True).stdout
    return "Mail queue is empty" in out


def _send(node: MailNode, to: str, subject: str, *, hops: int = 0) -> tuple[int, str]:
    """Send one message from outside (port 25); (250, ...) when queued, else the refusal."""
    received = "".join(
        f"Received: from hop{i}.example by hop{i + 1}.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n" for i in range(hops)
    )
    msg = f"{received}From: sender@client.test\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nhello\r\n"
    with contextlib.closing(node.smtp()) as s:
        try:
            s.sendmail("sender@client.test", [to], msg)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error.decode(errors="replace")
        return 250, "queued"


def test_a_loop_two_projects_build_ends_at_once_and_never_circles(tmp_path: Path) -> None:
    """Real Postfix and Dovecot with the bundle's default map layout (16 tables a map), fed by
    `mailstate serve` and pi-pull. Project 42's back@ goes to project 43's loop@, which goes
    back: each half was accepted (each project's own chain ends at the other's domain).

    Postfix expands virtual aliases in cleanup, before a message is queued: at its recursion
    limit (virtual_alias_recursion_limit, 1000) it gives up with 451 4.6.0 "Alias expansion
    error" in the same SMTP session. The message is never queued, delivered or relayed, so it
    cannot circle on the node; the sending server bounces it after its own retries (Postfix has
    no setting that makes this error permanent). A loop that leaves the node and comes back
    through other servers ends at Postfix's hop count (hopcount_limit, 50 Received: headers)
    with a 5xx, which the sender bounces at once. The defaults do both: main.cf sets neither."""
    with running_mailnode(map_buckets=DEFAULT_MAP_BUCKETS) as node:
        server, admin, p42 = start_server_for(node, tmp_path / "server")
        p43 = server.client(server.create_token(project=43, name="p43"))
        try:
            cfg = provision_node(node, server, admin, tmp_path / "etc")
            for domain, project, client in (("a.example", 42, p42), ("b.example", 43, p43)):
                assert (
                    admin.post(f"{API}/link-domain", json={"domain": domain, "project_id": project}).status_code == 201
                )
                assert client.post(f"{API}/enable-email", json={"domain": domain}).status_code == 200
            r = p42.post(f"{API}/add-user", json={"email": "keep@a.example", "password": PASSWORD})
            assert r.status_code == 201, r.text
            for client, address, dest in (
                (p42, "back@a.example", "loop@b.example"),
                (p43, "loop@b.example", "back@a.example"),
            ):
                r = client.post(f"{API}/add-alias", json={"address": address, "destinations": [dest]})
                assert r.status_code == 201, r.text
            tick = run_pi_pull(cfg, "--once")
            assert tick.returncode == 0, tick.stderr

            code, text = _send(node, "back@a.example", "round-and-round")
            assert code == 451 and "4.6.0" in text, (code, text)
            assert "unreasonable virtual_alias_maps map nesting for back@a.example" in node.postfix_log()
            assert _queue_empty(node)
            time.sleep(2)  # a queue run or two later, still nothing anywhere
            assert _queue_empty(node) and node.sink is not None and node.sink.messages == []

            # Mail to the mailbox beside the loop is delivered as ever.
            assert _send(node, "keep@a.example", "beside-the-loop")[0] == 250
            node.wait_for_message("keep@a.example", PASSWORD, "beside-the-loop")

            # A loop that leaves the node (an alias to an outside address that sends it back) adds
            # a Received: header a pass: at the 51st, Postfix answers 5xx and the sender bounces it.
            r = p42.post(f"{API}/add-alias", json={"address": "away@a.example", "destinations": ["far@internet.test"]})
            assert r.status_code == 201, r.text
            assert run_pi_pull(cfg, "--once").returncode == 0
            assert _send(node, "away@a.example", "first-pass")[0] == 250
            node.wait_sink("first-pass")
            code, text = _send(node, "away@a.example", "fifty-passes-later", hops=50)
            assert code // 100 == 5 and "hops" in text, (code, text)
            assert _queue_empty(node)
        finally:
            for client in (admin, p42, p43):
                client.close()
            server.stop()
