"""What mailbox owners ask for, end to end: `mailstate serve` → signed commits → the real
pi-pull single file → REAL Postfix, Dovecot with Pigeonhole (Sieve) and OpenDKIM on loopback.

The SMTP sink (tests/helpers/smtpsink.py) stands in for the internet: the node's Postfix relays every
message for a domain it does not host to it, so a vacation reply and a redirect are seen there,
as the internet would get them. Mail from the internet arrives on the node's port 25. Nothing is
faked; the node runs the bundle's default map layout and Dovecot snippet.
"""

from __future__ import annotations

import contextlib
import imaplib
import smtplib
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dkim
import httpx
import pytest

from tests.helpers.fleet import provision_node
from tests.helpers.mailnode import MailNode, free_ports, require_binaries, run_pi_pull, running_mailnode
from tests.helpers.opendkim import OpenDkim
from tests.helpers.server import LiveServer
from tests.helpers.smtpsink import Received

pytestmark = pytest.mark.e2e
API = "/v1/email-account"
PASSWORD = "correct horse battery"
ANNA = "anna@shop.example"


class World:
    def __init__(self, node: MailNode, server: LiveServer, p42: httpx.Client, ini: Path) -> None:
        self.node = node
        self.server = server
        self.p42 = p42
        self.ini = ini

    def call(self, name: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
        r = (
            self.p42.get(f"{API}/{name}", params=body)
            if name.startswith("list-")
            else self.p42.post(f"{API}/{name}", json=body)
        )
        assert r.status_code == status, r.text
        out: dict[str, Any] = r.json()
        return out

    def tick(self) -> str:
        r = run_pi_pull(self.ini)
        assert r.returncode == 0, r.stderr
        return r.stderr


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """A serve and a DKIM-signing node hosting anna@shop.example, its key active."""
    require_binaries("opendkim", "openssl", "sievec")
    (milter_port,) = free_ports(1)
    with running_mailnode(dkim_milter=f"inet:127.0.0.1:{milter_port}") as node:
        key_dir = node.workdir / "dkim"
        od = OpenDkim(node.workdir, milter_port, key_dir)
        server = LiveServer(tmp_path / "srv")
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
                fh.write(
                    f"[dkim]\nenabled = yes\nkey_dir = {key_dir}\nkey_owner =\npublish_wait = 0\nreload = {od.reload}\n"
                )
            assert (
                admin.post(f"{API}/link-domain", json={"domain": "shop.example", "project_id": 42}).status_code == 201
            )
            w = World(node, server, p42, ini)
            w.call("enable-email", {"domain": "shop.example"})
            w.call("add-user", {"email": ANNA, "password": PASSWORD}, status=201)
            w.tick()  # the release, and the node's first DKIM key (pending)
            od.start()
            w.tick()  # the key is active (publish_wait 0): OpenDKIM's tables list shop.example
            w.tick()
            yield w
        finally:
            od.stop()
            admin.close()
            p42.close()
            server.stop()


def deliver(node: MailNode, sender: str, subject: str, headers: str = "", to: str = ANNA) -> None:
    """A message from the internet to `to`, on the node's port 25."""
    msg = (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{uuid.uuid4().hex}@client.test>\r\n"
        f"{headers}\r\nhello from the internet\r\n"
    )
    with contextlib.closing(node.smtp()) as s:
        s.sendmail(sender, [to], msg.encode())
        s.quit()


def queue_empty(node: MailNode, timeout: float = 30.0) -> None:
    """Postfix delivered (or relayed) everything: a count of 0 then means 'not delivered'."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(["postqueue", "-c", str(node.postfix_dir), "-p"], capture_output=True, text=True).stdout
        if "Mail queue is empty" in out:
            return
        assert time.monotonic() < deadline, f"the queue did not drain: {out}\n{node.postfix_log()[-2000:]}"
        time.sleep(0.1)


def folder_subjects(node: MailNode, folder: str, password: str = PASSWORD) -> list[str]:
    m = node.imap(ANNA, password)
    try:
        typ, _ = m.select(f'"{folder}"', readonly=True)
        if typ != "OK":
            return []
        typ, data = m.search(None, "ALL")
        out = []
        for num in data[0].split():
            _, fetched = m.fetch(num, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            item = fetched[0]
            assert isinstance(item, tuple)
            out.append(bytes(item[1]).decode().partition(":")[2].strip())
        return out
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            m.logout()


def wait_in(node: MailNode, folder: str, subject: str, timeout: float = 20.0) -> list[str]:
    """The folder's subjects once `subject` is among them (IMAP SEARCH cannot take every subject)."""
    deadline = time.monotonic() + timeout
    while subject not in (found := folder_subjects(node, folder)):
        assert time.monotonic() < deadline, f"no {subject!r} in {folder}: {found}\n{node.dovecot_log()[-2000:]}"
        time.sleep(0.2)
    return found


def replies_to(node: MailNode, rcpt: str) -> list[Received]:
    assert node.sink is not None
    return [
        m
        for m in node.sink.messages
        if rcpt in m.rcpt_to and (m.header("Auto-Submitted") or "").startswith("auto-replied")
    ]


def dkim_verifies(w: World, msg: Received) -> bool:
    records = w.p42.get(f"{API}/dns-records", params={"domain": "shop.example"}).json()["records"]
    txt = {r["name"]: r["value"] for r in records if r["type"] == "TXT" and r.get("selector")}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return txt.get(name.decode().rstrip("."), "").encode()

    return bool(dkim.verify(msg.data, dnsfunc=dnsfunc))


def test_a_vacation_reply_reaches_a_sender_once_signed_and_never_a_list(world: World) -> None:
    w, node = world, world.node
    today = datetime.now(UTC).date()
    w.call(
        "set-vacation",
        {
            "email": ANNA,
            "enabled": True,
            "subject": 'Away "until" Monday',
            "body": "I am away.\n.\nA line with a dot, and \\ a backslash.\n",
            "start": (today - timedelta(days=1)).isoformat(),
            "end": (today + timedelta(days=7)).isoformat(),
            "interval_days": 7,
        },
    )
    assert w.call("list-users", {"domain": "shop.example"})["users"][0]["vacation"] == {
        "enabled": True,
        "start": (today - timedelta(days=1)).isoformat(),
        "end": (today + timedelta(days=7)).isoformat(),
    }
    log = w.tick()
    assert "owners: 1 sieve script(s)" in log, log
    deliver(node, "bob@client.test", "first from bob")
    assert node.sink is not None
    reply = node.sink.wait_for(
        lambda m: "bob@client.test" in m.rcpt_to,
        on_timeout=lambda: node.postfix_log()[-3000:] + node.dovecot_log()[-3000:],
    )
    assert reply.header("Subject") == 'Away "until" Monday'
    assert reply.mail_from == ""  # the null sender: a reply to a reply goes nowhere
    assert b"I am away.\r\n.\r\nA line with a dot, and \\ a backslash." in reply.data
    assert reply.header("From") and ANNA in (reply.header("From") or "")
    # Through the node's signing path: OpenDKIM signed it for shop.example, and it verifies.
    assert "d=shop.example" in (reply.header("DKIM-Signature") or ""), reply.data[:1500]
    assert dkim_verifies(w, reply)
    # Dovecot compiled the script once and keeps the binary in the mailbox's home.
    assert list(node.mail_root.glob("shop.example/anna~*/.mailstate-sieve/anna.svbin"))
    assert "sieve: binary" not in node.dovecot_log() and "failed to open" not in node.dovecot_log()

    # Again within the interval: delivered, no second reply. A list, bulk mail, an automatic
    # reply and the mailbox itself get none.
    deliver(node, "bob@client.test", "second from bob")
    deliver(node, "list@client.test", "a list message", "List-Id: <news.client.test>\r\n")
    deliver(node, "bulk@client.test", "a bulk message", "Precedence: bulk\r\n")
    deliver(node, "robot@client.test", "an auto-reply", "Auto-Submitted: auto-replied\r\n")
    node.submit(ANNA, PASSWORD, ANNA, [ANNA], "a note to myself")
    for subject in ("second from bob", "a list message", "a bulk message", "an auto-reply", "a note to myself"):
        node.wait_for_message(ANNA, PASSWORD, subject)
    queue_empty(node)
    assert len(replies_to(node, "bob@client.test")) == 1
    for sender in ("list@client.test", "bulk@client.test", "robot@client.test", ANNA):
        assert replies_to(node, sender) == [], sender

    # Turned off: a new sender gets nothing; the text is kept for next time.
    w.call("set-vacation", {"email": ANNA, "enabled": False, "body": "I am away.\n"})
    w.tick()
    deliver(node, "carol@client.test", "after the vacation")
    node.wait_for_message(ANNA, PASSWORD, "after the vacation")
    queue_empty(node)
    assert replies_to(node, "carol@client.test") == []
    assert (
        not list((node.root / "sieve" / "shop.example").glob("*.sieve"))
        if (node.root / "sieve" / "shop.example").exists()
        else True
    )


def test_a_vacation_outside_its_dates_sends_nothing(world: World) -> None:
    w, node = world, world.node
    later = datetime.now(UTC).date() + timedelta(days=30)
    w.call("set-vacation", {"email": ANNA, "enabled": True, "body": "Away later.", "start": later.isoformat()})
    w.tick()
    deliver(node, "dave@client.test", "before the vacation")
    node.wait_for_message(ANNA, PASSWORD, "before the vacation")
    queue_empty(node)
    assert replies_to(node, "dave@client.test") == []


def test_fileinto_and_redirect_filters(world: World) -> None:
    w, node = world, world.node
    w.call(
        "set-filters",
        {
            "email": ANNA,
            "filters": [
                {"name": "bills", "field": "subject", "op": "contains", "value": 'invoice "Q3"', "action": "fileinto",
                 "target": "Work/Invoices", "stop": True},
                {"name": "boss", "field": "from", "op": "is", "value": "boss@client.test", "action": "redirect",
                 "target": "anna.phone@faraway.example"},
                {"name": "news", "field": "header:X-Newsletter", "op": "is", "value": "yes", "action": "mark_read"},
            ],
        },
    )  # fmt: skip
    assert [f["name"] for f in w.call("list-filters", {"email": ANNA})["filters"]] == ["bills", "boss", "news"]
    w.tick()
    deliver(node, "shop@client.test", 'Your invoice "Q3" is here')
    deliver(node, "friend@client.test", "just hello")
    deliver(node, "boss@client.test", "come to my office")
    deliver(node, "news@client.test", "weekly news", "X-Newsletter: yes\r\n")
    node.wait_for_message(ANNA, PASSWORD, "just hello")
    assert node.sink is not None
    redirected = node.sink.wait_for(lambda m: "anna.phone@faraway.example" in m.rcpt_to)
    assert redirected.header("Subject") == "come to my office"
    queue_empty(node)
    assert folder_subjects(node, "Work.Invoices") == ['Your invoice "Q3" is here']
    inbox = folder_subjects(node, "INBOX")
    assert "just hello" in inbox and 'Your invoice "Q3" is here' not in inbox
    assert "come to my office" not in inbox  # redirected, not kept
    m = node.imap(ANNA, PASSWORD)
    try:
        m.select("INBOX", readonly=True)
        _, seen = m.search(None, "SEEN")
        _, news = m.search(None, "SUBJECT", '"weekly news"')
        assert news[0] and set(news[0].split()) <= set(seen[0].split())  # marked read
    finally:
        m.logout()

    # Removing the rules takes the script away: the next invoice stays in INBOX.
    w.call("set-filters", {"email": ANNA, "filters": []})
    w.tick()
    assert not (node.root / "sieve" / "shop.example" / "anna.sieve").exists()
    deliver(node, "shop@client.test", 'Another invoice "Q3"')
    wait_in(node, "INBOX", 'Another invoice "Q3"')


def _smtp_login(node: MailNode, password: str) -> bool:
    with contextlib.closing(node.submission()) as s:
        try:
            s.login(ANNA, password)
        except smtplib.SMTPAuthenticationError:
            return False
        return True


def test_an_imap_only_app_password_reads_but_cannot_send_and_dies_when_removed(world: World) -> None:
    w, node = world, world.node
    made = w.call("add-app-password", {"email": ANNA, "name": "iPhone Anna", "scopes": ["imap"]}, status=201)
    phone = made["password"]
    assert set(made) == {"name", "scopes", "password", "commit"} and made["scopes"] == ["imap"]
    sender = w.call("add-app-password", {"email": ANNA, "name": "Scanner", "scopes": ["smtp"]}, status=201)["password"]
    # Only the hash is in git; the password is nowhere in the repo or the server's log.
    repo = subprocess.run(
        ["git", "-C", str(w.server.data.repo), "log", "-p", "--all"], capture_output=True, text=True, check=True
    ).stdout
    assert phone not in repo and sender not in repo and "{BLF-CRYPT}" in repo
    assert phone not in w.server.log_text()
    w.tick()

    assert node.can_login(ANNA, phone)  # IMAP, with the mailbox address as the login
    assert not _smtp_login(node, phone)  # an imap-only password cannot send
    assert _smtp_login(node, sender) and not node.can_login(ANNA, sender)
    assert node.can_login(ANNA, PASSWORD) and _smtp_login(node, PASSWORD)  # the mailbox's own still works
    assert not node.can_login(ANNA, phone[:-1] + ("x" if phone[-1] != "x" else "y"))
    node.submit(ANNA, sender, ANNA, ["someone@faraway.example"], "sent with an app password")
    node.wait_sink("sent with an app password")

    # The node saw the login; its next report says so.
    w.tick()
    listed = {p["name"]: p for p in w.call("list-app-passwords", {"email": ANNA})["app_passwords"]}
    assert listed["iPhone Anna"]["last_used_at"] is not None
    assert listed["Scanner"]["last_used_at"] is not None
    assert "password" not in listed["iPhone Anna"]

    w.call("remove-app-password", {"email": ANNA, "name": "iPhone Anna"})
    w.tick()
    # Dovecot looks at a passwd-file again at most once a second (passwd_file_sync), and the
    # file was rewritten in place, with no reload: a login in the same second as the last one
    # may still see the old file.
    deadline = time.monotonic() + 5
    while node.can_login(ANNA, phone) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not node.can_login(ANNA, phone)
    assert _smtp_login(node, sender) and node.can_login(ANNA, PASSWORD)
