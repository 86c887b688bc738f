"""Port 25's postscreen end to end: real Postfix with the bundle's postscreen entries and its
DEFAULT blocklists (zen.spamhaus.org=127.0.0.[2..11]*3, bl.spamcop.net=127.0.0.2*2, threshold 3),
a real DNS server (knot) serving those two zones, real `mailstate serve` and the real pi-pull single
file counting the refusals into its report.

Postfix resolves through knot: knot listens on port 53 of a loopback address of its own, and
Postfix runs in a mount namespace of its own where that address is /etc/resolv.conf's nameserver
(tests/helpers/mailnode.py, ``resolv_conf``). Each client connects from a loopback address of its
own, which postscreen looks up as <reversed address>.<list>; the test client's usual 127.0.0.1 is
not used here (the test node lets it skip postscreen's tests).

A first contact waits out postscreen's greeting test (postscreen_greet_wait, 6 s) before it is
judged: each client below costs that once.
"""

from __future__ import annotations

import contextlib
import email.utils
import secrets
import smtplib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers.fleet import provision_node
from tests.helpers.knot import KnotServer
from tests.helpers.mailnode import MailNode, run_pi_pull, running_mailnode
from tests.helpers.server import LiveServer

pytestmark = pytest.mark.e2e
API = "/v1/email-account"
PASSWORD = "correct horse battery"
LISTED = "127.0.0.2"  # zen.spamhaus.org lists it (Spamhaus's own test entry answers 127.0.0.2)
CLEAN = "127.0.0.3"  # no list names it
WEAK = (
    "127.0.0.4"  # zen answers 127.255.255.254 (Spamhaus refusing the resolver: filtered out), spamcop lists it (2 < 3)
)
EARLY = "127.0.0.5"  # talks before its turn


@dataclass
class World:
    node: MailNode
    knot: KnotServer
    server: LiveServer
    admin: httpx.Client
    ini: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("postscreen")
    dns_host = f"127.53.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}"
    with KnotServer(tmp / "knot", ["zen.spamhaus.org", "bl.spamcop.net"], host=dns_host, port=53) as knot:
        knot.set_zone("zen.spamhaus.org", ["2.0.0.127 A 127.0.0.2", "4.0.0.127 A 127.255.255.254"])
        knot.set_zone("bl.spamcop.net", ["4.0.0.127 A 127.0.0.2"])
        resolv = tmp / "resolv.conf"
        resolv.write_text(f"nameserver {dns_host}\noptions timeout:2 attempts:2\n")
        with running_mailnode(resolv_conf=resolv) as node:
            server = LiveServer(tmp / "srv")
            server.cli(
                "init", "--data", str(server.data.root), "--bcrypt-cost", "4", "--mail-root", str(node.mail_root),
                "--uid", str(node.uid), "--gid", str(node.gid), "--mx-host", "mx1.platform.test",
            )  # fmt: skip
            server.admin_token = server.create_token(name="admin")
            project = server.create_token(project=42, name="p42")
            server.start()
            admin, p42 = server.client(server.admin_token), server.client(project)
            try:
                ini = provision_node(node, server, admin, node.workdir / "etc", name="mpi01")
                with open(ini, "a") as fh:  # the bundle's [postscreen], pointed at this node's maillog_file
                    fh.write(f"[postscreen]\nlog = {node.workdir / 'postfix.log'}\n")
                assert admin.post(f"{API}/link-domain", json={"domain": "shop.example", "project_id": 42}).is_success
                assert p42.post(f"{API}/enable-email", json={"domain": "shop.example"}).status_code == 200
                user = {"email": "anna@shop.example", "password": PASSWORD}
                assert p42.post(f"{API}/add-user", json=user).status_code == 201
                tick(ini)
                yield World(node, knot, server, admin, ini)
            finally:
                admin.close()
                p42.close()
                server.stop()


def tick(ini: Path) -> None:
    r = run_pi_pull(ini)
    assert r.returncode == 0, r.stderr


def connect(node: MailNode, source: str) -> smtplib.SMTP:
    """An SMTP session with port 25 from ``source``, greeting read (raises SMTPConnectError on a refusal)."""
    return smtplib.SMTP("127.0.0.1", node.smtp_port, timeout=30, source_address=(source, 0))


def deliver(node: MailNode, source: str, subject: str) -> None:
    msg = (
        f"From: bob@sender.test\r\nTo: anna@shop.example\r\nSubject: {subject}\r\n"
        f"Date: {email.utils.formatdate()}\r\nMessage-ID: <{subject.replace(' ', '.')}@sender.test>\r\n\r\nHello.\r\n"
    )
    with contextlib.closing(connect(node, source)) as s:
        s.ehlo("mx.sender.test")
        assert s.sendmail("bob@sender.test", ["anna@shop.example"], msg) == {}
        s.quit()


def postscreen(w: World) -> dict[str, object]:
    r = w.admin.get(f"{API}/list-nodes")
    assert r.status_code == 200, r.text
    (entry,) = [n for n in r.json()["nodes"] if n["name"] == "mpi01"]
    assert isinstance(entry["postscreen"], dict), entry
    return entry["postscreen"]


def wait_logged(w: World, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in w.node.postfix_log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{w.node.postfix_log()[-3000:]}"
        time.sleep(0.1)


def test_a_listed_client_is_refused_at_connect_and_an_unlisted_one_delivers(world: World) -> None:
    before = world.knot.queries()
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        connect(world.node, LISTED)
    assert refused.value.smtp_code == 521, refused.value
    assert b"5.7.1 Service unavailable; client [127.0.0.2] blocked using zen.spamhaus.org" in refused.value.smtp_error
    assert world.knot.queries() > before  # Postfix asked knot, not the machine's resolver
    deliver(world.node, CLEAN, "From a clean client")
    world.node.wait_for_message("anna@shop.example", PASSWORD, "From a clean client")
    # the default filter and weights: Spamhaus's "refused resolver" answer does not count, SpamCop alone is 2 < 3
    deliver(world.node, WEAK, "From a weakly listed client")
    world.node.wait_for_message("anna@shop.example", PASSWORD, "From a weakly listed client")
    for line in (f"DNSBL rank 3 for [{LISTED}]", f"PASS NEW [{CLEAN}]", f"PASS NEW [{WEAK}]"):
        wait_logged(world, line)
    # passed once, a client goes straight to smtpd (no new wait)
    started = time.monotonic()
    with contextlib.closing(connect(world.node, CLEAN)) as s:
        s.quit()
    assert time.monotonic() - started < 5
    wait_logged(world, f"PASS OLD [{CLEAN}]")


def test_a_client_that_talks_before_its_turn_gets_550(world: World) -> None:
    s = smtplib.SMTP(timeout=30)
    s.sock = socket.create_connection(("127.0.0.1", world.node.smtp_port), 30, source_address=(EARLY, 0))
    try:
        s.sock.sendall(b"EHLO early.test\r\n")  # before the greeting is complete
        code, text = s.getreply()  # the greeting's first half, then (one reply to smtplib) the EHLO's answer
        if code == 220:
            code, text = s.getreply()
        assert code == 250, (code, text)
        assert s.mail("bob@sender.test")[0] == 250
        code, text = s.rcpt("anna@shop.example")
        assert code == 550 and b"Protocol error" in text, (code, text)
    finally:
        s.close()
    wait_logged(world, "PREGREET 17 after 0")


def test_the_refusals_are_counted_in_the_report_list_nodes_and_metrics(world: World) -> None:
    tick(world.ini)
    before = postscreen(world)
    with pytest.raises(smtplib.SMTPConnectError):
        connect(world.node, LISTED)  # a refusal is not remembered: the lists are asked again
    logged = world.node.postfix_log().count(f"DNSBL rank 3 for [{LISTED}]")
    wait_logged(world, f"DNSBL rank 3 for [{LISTED}]")
    deadline = time.monotonic() + 10
    while (logged := world.node.postfix_log().count("DNSBL rank")) < (before["dnsbl_rejected"] or 0) + 1:
        assert time.monotonic() < deadline, world.node.postfix_log()[-2000:]
        time.sleep(0.1)
    tick(world.ini)
    after = postscreen(world)
    log = world.node.postfix_log()
    assert after == {"dnsbl_rejected": logged, "pregreet_rejected": log.count("PREGREET"), "error": None}, after
    assert after["dnsbl_rejected"] == (before["dnsbl_rejected"] or 0) + 1
    metrics = world.admin.get("/metrics").text
    assert f'mailstate_node_postscreen_rejected{{node="mpi01",test="dnsbl"}} {float(logged)}' in metrics
    assert 'mailstate_node_postscreen_rejected{node="mpi01",test="pregreet"}' in metrics


def test_with_no_list_postscreen_still_meets_every_client() -> None:
    """`mailstate node bundle --dnsbl none` (a node without DNS of its own): Postfix starts with
    postscreen on port 25, asks no list, and a new client gets smtpd after the greeting test."""
    with running_mailnode(dnsbl_sites=()) as node:
        assert "postscreen_dnsbl_sites =\n" in (node.postfix_dir / "main.cf").read_text()
        started = time.monotonic()
        with contextlib.closing(connect(node, "127.0.0.9")) as s:
            assert s.ehlo("mx.sender.test")[0] == 250
            assert s.mail("bob@sender.test")[0] == 250  # handed over: smtpd speaks
            s.quit()
        assert time.monotonic() - started >= 5  # the greeting test still ran
        deadline = time.monotonic() + 10
        while "PASS NEW [127.0.0.9]" not in node.postfix_log():
            assert time.monotonic() < deadline, node.postfix_log()[-2000:]
            time.sleep(0.1)
        assert "dnsblog" not in node.postfix_log()
