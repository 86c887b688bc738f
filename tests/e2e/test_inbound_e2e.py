"""Inbound filtering end to end: real `mailstate serve`, real Postfix + Dovecot, a real rspamd
configured with the bundle's ``local.d`` files as the milter of port 25, a real DNS server
(knot) for rspamd's lookups, and the real pi-pull single file reporting the filter's state.

The test client speaks for an outside address with Postfix's XCLIENT (the test node allows it
from loopback): rspamd sees mail from 198.51.100.7, which the sender domain's SPF record names.
rspamd starts once for the module (a start compiles its rules: ~15 s); the test that stops it
runs last.
"""

from __future__ import annotations

import contextlib
import email
import grp
import pwd
import smtplib
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mailstate.compiler.node_bundle import GTUBE, GTUBE_MARKER, MAX_RSPAMD_SCORE
from tests.helpers.fleet import provision_node
from tests.helpers.knot import KnotServer
from tests.helpers.mailnode import MailNode, run_pi_pull, running_mailnode
from tests.helpers.rspamd import Rspamd
from tests.helpers.server import LiveServer

pytestmark = pytest.mark.e2e
API = "/v1/email-account"
PASSWORD = "correct horse battery"
OUTSIDE = "198.51.100.7"  # the sending server, as rspamd sees it (XCLIENT)


@dataclass
class World:
    node: MailNode
    rspamd: Rspamd
    server: LiveServer
    admin: httpx.Client
    project: httpx.Client
    ini: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("inbound")
    with KnotServer(tmp / "knot", ["sender.test"]) as knot:
        knot.set_zone(
            "sender.test",
            [f'@ TXT "v=spf1 ip4:{OUTSIDE} -all"', f"mx A {OUTSIDE}", "@ MX 10 mx.sender.test."],
        )
        rs = Rspamd(tmp / "rspamd", dns=knot.address)
        try:
            with running_mailnode(spam_milter=rs.milter, spam_controller=rs.controller) as node:
                rs.use_node(node)
                rs.start()
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
                    with open(ini, "a") as fh:
                        fh.write(f"[spam]\nenabled = yes\ncontroller = {rs.controller}\nreload = {rs.reload_command}\n")
                    link = {"domain": "shop.example", "project_id": 42}
                    assert admin.post(f"{API}/link-domain", json=link).status_code == 201
                    assert p42.post(f"{API}/enable-email", json={"domain": "shop.example"}).status_code == 200
                    user = {"email": "anna@shop.example", "password": PASSWORD}
                    assert p42.post(f"{API}/add-user", json=user).status_code == 201
                    config_id = (rs.stat() or {}).get("config_id")
                    tick(ini)  # writes rspamd's files from the state (none yet) and reloads it once
                    rs.wait_reloaded(config_id)
                    yield World(node, rs, server, admin, p42, ini)
                finally:
                    admin.close()
                    p42.close()
                    server.stop()
        finally:
            rs.stop()


def tick(ini: Path) -> None:
    r = run_pi_pull(ini)
    assert r.returncode == 0, r.stderr


def send_from_outside(node: MailNode, subject: str, body: str, *, sloppy: bool = False) -> tuple[int, str]:
    """Send one message to anna@shop.example as mx.sender.test (198.51.100.7); the first reply
    that is not a success (code, text), or (250, ...) when the message was accepted. ``sloppy``:
    from a client without a host name (no reverse DNS), which rspamd scores (HFILTER_HOSTNAME_UNKNOWN: 2.5)."""
    ids = f"Message-ID: <{subject.replace(' ', '.')}@sender.test>\r\nDate: {email.utils.formatdate()}\r\n"
    name = "[UNAVAILABLE]" if sloppy else "mx.sender.test"
    msg = (
        f"From: Bob <bob@sender.test>\r\nTo: anna@shop.example\r\nSubject: {subject}\r\n{ids}"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{body}\r\n"
    )
    with contextlib.closing(smtplib.SMTP("127.0.0.1", node.smtp_port, timeout=60)) as s:
        s.ehlo("mx.sender.test")
        code, text = s.docmd("XCLIENT", f"ADDR={OUTSIDE} NAME={name} HELO=mx.sender.test")
        assert code == 220, (code, text)
        s.ehlo("mx.sender.test")
        for step in (lambda: s.mail("bob@sender.test"), lambda: s.rcpt("anna@shop.example")):
            code, reply = step()
            if code >= 400:
                return code, reply.decode()
        code, reply = s.data(msg.encode())
        return code, reply.decode()


def spam_filter(w: World) -> dict[str, object]:
    r = w.admin.get(f"{API}/list-nodes")
    assert r.status_code == 200, r.text
    (entry,) = [n for n in r.json()["nodes"] if n["name"] == "mpi01"]
    assert isinstance(entry["spam_filter"], dict), entry
    return entry["spam_filter"]


def test_a_clean_message_reaches_inbox_with_authentication_results(world: World) -> None:
    # the bundle's milter: a UNIX socket in Postfix's queue, 0660, group postfix (its directory's setgid)
    conf = subprocess.run(["postconf", "-c", str(world.node.postfix_dir), "-h", "smtpd_milters"], capture_output=True)
    assert conf.stdout.decode().strip() == "unix:rspamd/milter.sock"
    assert world.rspamd.socket == world.node.workdir / "postfix" / "queue" / "rspamd" / "milter.sock"
    st = world.rspamd.socket.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
    assert (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name) == ("_rspamd", "postfix")
    code, reply = send_from_outside(world.node, "Lunch on Friday", "Shall we meet at noon?")
    assert code == 250, reply
    raw = world.node.wait_for_message("anna@shop.example", PASSWORD, "Lunch on Friday", timeout=60)
    msg = email.message_from_bytes(raw)
    results = " ".join(str(h) for h in msg.get_all("Authentication-Results", []))
    assert "spf=pass" in results and "bob@sender.test" in results, msg.as_string()[:3000]
    status = str(msg["X-Spam-Status"])
    assert status.startswith("No, score="), msg.as_string()[:3000]
    assert msg["X-Spam"] is None


def set_policy(w: World, body: dict[str, object]) -> None:
    """set-spam-policy, then a tick: pi-pull writes rspamd's settings and reloads it."""
    r = w.project.post(f"{API}/set-spam-policy", json=body)
    assert r.status_code == 200 and r.json()["commit"], r.text
    config_id = (w.rspamd.stat() or {}).get("config_id")
    tick(w.ini)
    w.rspamd.wait_reloaded(config_id)


def folder_subjects(w: World, folder: str) -> list[str]:
    imap = w.node.imap("anna@shop.example", PASSWORD)
    try:
        typ, _ = imap.select(folder)
        if typ != "OK":
            return []
        typ, data = imap.search(None, "ALL")
        out = []
        for num in data[0].split():
            typ, fetched = imap.fetch(num, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            item = fetched[0]
            assert isinstance(item, tuple)
            out.append(email.message_from_bytes(item[1])["Subject"])
        return out
    finally:
        imap.logout()


def wait_in(w: World, folder: str, subject: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while subject not in folder_subjects(w, folder):
        assert time.monotonic() < deadline, f"{subject!r} not in {folder}: {w.rspamd.log()[-4000:]}"
        time.sleep(0.3)


def test_the_policy_decides_junk_reject_or_off(world: World) -> None:
    # junk from 2: a sloppy message (2.5 and up) goes to Junk through the Sieve pipeline
    set_policy(world, {"email": "anna@shop.example", "action": "junk", "junk_score": 2})
    code, reply = send_from_outside(world.node, "Sloppy one", "From a host without a name.", sloppy=True)
    assert code == 250, reply
    wait_in(world, "Junk", "Sloppy one")
    assert "Sloppy one" not in folder_subjects(world, "INBOX")
    # reject from 3 (the domain's policy; the mailbox's own removed): refused at SMTP time
    set_policy(world, {"email": "anna@shop.example", "action": None})
    set_policy(world, {"domain": "shop.example", "action": "reject", "junk_score": 1, "reject_score": 3})
    code, reply = send_from_outside(world.node, "Sloppy two", "From a host without a name.", sloppy=True)
    assert code == 554 and "refused as spam" in reply, (code, reply)
    # off: the same message reaches INBOX, marked with its score but not as spam
    set_policy(world, {"domain": "shop.example", "action": "off"})
    code, reply = send_from_outside(world.node, "Sloppy three", "From a host without a name.", sloppy=True)
    assert code == 250, reply
    raw = world.node.wait_for_message("anna@shop.example", PASSWORD, "Sloppy three", timeout=60)
    msg = email.message_from_bytes(raw)
    assert msg["X-Spam"] is None and str(msg["X-Spam-Status"]).startswith("No, score="), msg.as_string()[:2000]
    set_policy(world, {"domain": "shop.example", "action": None})


def score(msg: email.message.Message) -> float:
    """rspamd's score of a delivered message (its X-Spam-Status: "Yes, score=12.30")."""
    return float(str(msg["X-Spam-Status"]).partition("score=")[2].split(",")[0])


def body_of(raw: bytes) -> str:
    payload = email.message_from_bytes(raw).get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


def test_gtube_follows_the_policy_junk_reject_or_off(world: World) -> None:
    # Port 25's Postfix writes GTUBE as the marker rspamd's MAILSTATE_GTUBE scores as certain spam,
    # so the policy decides. The default (junk): Junk, through the Sieve pipeline.
    code, reply = send_from_outside(world.node, "GTUBE junked", f"Buy now!\r\nTest: {GTUBE} (really)")
    assert code == 250, reply
    wait_in(world, "Junk", "GTUBE junked")
    assert "GTUBE junked" not in folder_subjects(world, "INBOX")
    raw = world.node.wait_for_message("anna@shop.example", PASSWORD, "GTUBE junked", timeout=5, folder="Junk")
    msg = email.message_from_bytes(raw)
    assert msg["X-Spam"] == "Yes" and score(msg) > MAX_RSPAMD_SCORE, msg.as_string()[:3000]  # MAILSTATE_GTUBE
    assert f"Test: {GTUBE_MARKER} (really)" in body_of(raw) and GTUBE not in body_of(raw)
    # reject (the domain's policy, at its highest reject_score): refused at SMTP time, and counted
    before = world.rspamd.stat() or {}
    set_policy(world, {"domain": "shop.example", "action": "reject", "junk_score": 99, "reject_score": 100})
    code, reply = send_from_outside(world.node, "GTUBE refused", f"Buy now!\r\n{GTUBE}")
    assert code == 554 and "refused as spam" in reply, (code, reply)
    after = world.rspamd.stat() or {}
    assert isinstance(after.get("actions"), dict) and isinstance(before.get("actions"), dict)
    assert after["actions"]["reject"] == before["actions"]["reject"] + 1
    tick(world.ini)
    report = spam_filter(world)
    assert report["running"] is True and report["error"] is None
    assert isinstance(report["scanned"], int) and report["scanned"] >= 2
    assert report["rejected"] == after["actions"]["reject"]
    metrics = world.admin.get("/metrics").text
    assert 'mailstate_node_spam_filter_up{node="mpi01"} 1.0' in metrics
    assert f'mailstate_node_spam_messages{{node="mpi01",result="rejected"}} {float(report["rejected"])}' in metrics
    # off: INBOX, not marked as spam
    set_policy(world, {"domain": "shop.example", "action": "off"})
    code, reply = send_from_outside(world.node, "GTUBE let through", GTUBE)
    assert code == 250, reply
    raw = world.node.wait_for_message("anna@shop.example", PASSWORD, "GTUBE let through", timeout=60)
    msg = email.message_from_bytes(raw)
    assert msg["X-Spam"] is None and str(msg["X-Spam-Status"]).startswith("No, score="), msg.as_string()[:2000]
    assert body_of(raw).strip() == GTUBE_MARKER and score(msg) > MAX_RSPAMD_SCORE
    set_policy(world, {"domain": "shop.example", "action": None})


def test_gtube_sent_through_submission_leaves_unchanged(world: World) -> None:
    # only port 25 rewrites it: a user may send GTUBE out to test another server's filter
    world.node.submit(
        "anna@shop.example", PASSWORD, "anna@shop.example", ["tester@elsewhere.test"], "GTUBE out",
        body=f"Testing your filter:\r\n{GTUBE}\r\n",
    )  # fmt: skip
    got = world.node.wait_sink("GTUBE out", timeout=60)
    assert GTUBE.encode() in got.data and GTUBE_MARKER.encode() not in got.data


def learned(w: World) -> dict[str, int]:
    """How many messages rspamd's Bayes holds per class (``rspamc stat``: each statfile's revision)."""
    stat = w.rspamd.stat()
    assert stat is not None and isinstance(stat.get("statfiles"), list) and stat["statfiles"], stat
    return {str(f["symbol"]): int(f["revision"]) for f in stat["statfiles"]}


def move(w: World, subject: str, source: str, target: str) -> None:
    """One IMAP MOVE of the message with ``subject`` from ``source`` to ``target``, as a mail client does it."""
    imap = w.node.imap("anna@shop.example", PASSWORD)
    try:
        imap.create(target)  # "already exists" is fine: a client's own folders
        typ, _ = imap.select(source)
        assert typ == "OK", source
        typ, data = imap.uid("SEARCH", "SUBJECT", f'"{subject}"')
        (uid,) = data[0].split()
        typ, data = imap.uid("MOVE", uid, target)
        assert typ == "OK", data
    finally:
        imap.logout()


# Enough words for rspamd's Bayes (it learns nothing from fewer than 11 tokens).
LEARN_BODY = (
    "Dear friend, our exclusive offer on premium replica watches ends tonight. Order three and get a "
    "fourth one free, with worldwide shipping and a lifetime guarantee on every single piece we sell."
)


def test_moving_to_junk_learns_spam_and_out_of_it_learns_ham(world: World) -> None:
    for subject in ("Watches one", "Watches two"):
        code, reply = send_from_outside(world.node, subject, f"{LEARN_BODY} {subject}.")
        assert code == 250, reply
        world.node.wait_for_message("anna@shop.example", PASSWORD, subject, timeout=60)
    start = learned(world)
    # into Junk: IMAPSieve pipes it to rspamd-learn, rspamd learns spam (before the MOVE answers)
    move(world, "Watches one", "INBOX", "Junk")
    assert learned(world) == {**start, "BAYES_SPAM": start["BAYES_SPAM"] + 1}, [
        ln for ln in world.rspamd.log().splitlines() if "learn" in ln.lower()
    ][-10:]
    # Junk to Trash: deleting spam teaches nothing
    move(world, "Watches one", "Junk", "Trash")
    assert learned(world) == {**start, "BAYES_SPAM": start["BAYES_SPAM"] + 1}
    # into Junk and back out (not to Trash): rspamd unlearns the spam and learns ham
    move(world, "Watches two", "INBOX", "Junk")
    assert learned(world)["BAYES_SPAM"] == start["BAYES_SPAM"] + 2
    move(world, "Watches two", "Junk", "INBOX")
    assert learned(world) == {"BAYES_SPAM": start["BAYES_SPAM"] + 1, "BAYES_HAM": start["BAYES_HAM"] + 1}
    # never the controller's password: the program asks the loopback controller, which trusts loopback
    program = (world.node.workdir / "learn" / "sieve-pipe" / "rspamd-learn").read_text()
    assert f"-h {world.rspamd.controller} " in program and "--password" not in program and " -P " not in program


def rule(w: World, op: str, body: dict[str, object], status: int = 200) -> None:
    """add-sender-rule / remove-sender-rule, then a tick: pi-pull writes rspamd's settings and reloads it."""
    r = w.project.post(f"{API}/{op}", json=body)
    assert r.status_code == status and r.json()["commit"], r.text
    config_id = (w.rspamd.stat() or {}).get("config_id")
    tick(w.ini)
    w.rspamd.wait_reloaded(config_id)


def test_a_blocked_sender_is_refused_and_an_allowed_one_passes_a_high_score(world: World) -> None:
    rule(world, "add-sender-rule", {"email": "anna@shop.example", "sender": "@sender.test", "action": "block"}, 201)
    code, reply = send_from_outside(world.node, "From a blocked domain", "Hello.")
    assert 500 <= code < 600, (code, reply)
    rule(world, "remove-sender-rule", {"email": "anna@shop.example", "sender": "@sender.test"})
    # the domain refuses from 1: a sloppy message is refused, unless its sender is on the allow list
    set_policy(world, {"domain": "shop.example", "action": "reject", "junk_score": 0.5, "reject_score": 1})
    code, reply = send_from_outside(world.node, "Refused before the allow", "Hi.", sloppy=True)
    assert code == 554, (code, reply)
    rule(world, "add-sender-rule", {"domain": "shop.example", "sender": "bob@sender.test", "action": "allow"}, 201)
    code, reply = send_from_outside(world.node, "Allowed despite the score", "Hi.", sloppy=True)
    assert code == 250, reply
    raw = world.node.wait_for_message("anna@shop.example", PASSWORD, "Allowed despite the score", timeout=60)
    assert email.message_from_bytes(raw)["X-Spam"] is None
    # GTUBE too (port 25 hands rspamd the marker, scored like any spam)
    code, reply = send_from_outside(world.node, "Allowed GTUBE", GTUBE)
    assert code == 250, reply
    raw = world.node.wait_for_message("anna@shop.example", PASSWORD, "Allowed GTUBE", timeout=60)
    assert email.message_from_bytes(raw)["X-Spam"] is None
    rule(world, "remove-sender-rule", {"domain": "shop.example", "sender": "bob@sender.test"})
    set_policy(world, {"domain": "shop.example", "action": None})


def test_with_rspamd_down_mail_tempfails_and_the_report_says_so(world: World) -> None:
    world.rspamd.stop()
    code, reply = send_from_outside(world.node, "While the filter is down", "Please wait for me.")
    assert 400 <= code < 500, (code, reply)
    tick(world.ini)
    report = spam_filter(world)
    assert report["running"] is False and "rspamd does not answer" in str(report["error"]), report
    assert 'mailstate_node_spam_filter_up{node="mpi01"} 0.0' in world.admin.get("/metrics").text
    # never delivered unfiltered, never bounced: Postfix holds nothing, the INBOX has nothing
    time.sleep(1)
    imap = world.node.imap("anna@shop.example", PASSWORD)
    try:
        imap.select("INBOX")
        typ, data = imap.search(None, "SUBJECT", '"While the filter is down"')
        assert typ == "OK" and data[0] == b"", data
    finally:
        imap.logout()
