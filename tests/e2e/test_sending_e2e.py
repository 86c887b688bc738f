"""Outbound limits end to end: `mailstate serve` → signed commits → pi-pull ticks → REAL Postfix
on the submission port (587, STARTTLS, SASL through Dovecot) asking the bundle's policy service
(`pi_pull.py policy`, pipull/policy.py), and its figures reported back to the server.

A mailbox over its send_per_hour gets a 4xx with a sentence at RCPT TO (a message to several
recipients counts each); past auto_suspend_factor x the limit the node suspends it (5xx) and the
server records that in the state; a suspended mailbox still receives mail and logs in (IMAP
and SMTP AUTH) but every submission gets a 5xx; resume-sending lets it send again. The counts
survive a restart of the policy service. Nothing is faked: the SMTP sink stands in for the
internet (tests/smtpsink.py)."""

from __future__ import annotations

import contextlib
import time

import pytest

from tests.helpers.fleet import P1, P2, Fleet
from tests.helpers.mailnode import MailNode

pytestmark = pytest.mark.e2e

EXIT_OK = 0
OUT = ["a@internet.test", "b@internet.test", "c@internet.test", "d@internet.test"]


def apply(f: Fleet) -> None:
    r = f.tick()
    assert r.returncode == EXIT_OK, r.stderr


def rcpts(node: MailNode, user: str, password: str, to: list[str]) -> list[tuple[int, str]]:
    """Log in, MAIL FROM the user, and each RCPT TO's answer (then the message if any was taken)."""
    with contextlib.closing(node.submission()) as s:
        s.login(user, password)
        code, msg = s.mail(user)
        assert code == 250, (code, msg)
        answers = []
        for address in to:
            code, msg = s.rcpt(address)
            answers.append((code, msg.decode(errors="replace")))
        if any(code == 250 for code, _ in answers):
            code, msg = s.data(f"From: {user}\r\nSubject: burst\r\n\r\nhello\r\n".encode())
            assert code == 250, (code, msg)
        else:
            s.rset()
        s.quit()
        return answers


def user_row(f: Fleet, email: str) -> dict[str, object]:
    users = f.call(f.project, "list-users", {"domain": email.split("@")[1]})["users"]
    assert isinstance(users, list)
    return next(u for u in users if u["email"] == email)


@pytest.fixture
def limited(fleet: Fleet) -> Fleet:
    f = fleet
    f.call(f.admin, "link-domain", {"domain": "example.com", "project_id": 42}, status=201)
    f.call(f.project, "enable-email", {"domain": "example.com"})
    for local, pw in (("info", P1), ("bob", P2)):
        f.call(f.project, "add-user", {"email": f"{local}@example.com", "password": pw}, status=201)
    # Three recipients an hour for each mailbox of the domain; the default auto_suspend_factor is 3.
    f.call(f.admin, "set-limits", {"domain": "example.com", "send_per_hour": 3})
    apply(f)
    return f


def test_limit_then_suspension_then_resume_through_real_postfix(limited: Fleet) -> None:
    f, node = limited, limited.node
    # A message to two recipients counts two, the next one to one counts one: 3 of 3.
    assert node.submit("info@example.com", P1, "info@example.com", OUT[:2], "two-recipients") == {}
    node.wait_sink("two-recipients")
    assert node.submit("info@example.com", P1, "info@example.com", OUT[2:3], "third-recipient") == {}
    node.wait_sink("third-recipient")
    # The counts are kept in the policy service's database: they survive its restart.
    node.stop_policy()
    node.start_policy()
    answers = rcpts(node, "info@example.com", P1, OUT[3:4])
    ((code, msg),) = answers
    assert code == 450 and "4.7.1" in msg and "3 recipient(s) an hour" in msg, answers
    # Another mailbox of the domain has its own count.
    assert node.submit("bob@example.com", P2, "bob@example.com", OUT[:1], "bob-sends") == {}
    node.wait_sink("bob-sends")
    # Inbound mail to the limited mailbox still arrives.
    node.send("info@example.com", "inbound-while-limited")
    node.wait_for_message("info@example.com", P1, "inbound-while-limited")
    # The node reports the figures; list-users shows them.
    apply(f)
    row = user_row(f, "info@example.com")
    sent = row["sent"]
    assert row["sending"] == "limited" and isinstance(sent, dict), row
    assert 'mailstate_mailboxes_sending{state="limited"} 1.0' in f.admin.get("/metrics").text
    assert (sent["recipients_hour"], sent["messages_hour"], sent["refused_hour"]) == (3, 2, 1), sent
    # Keep hammering: past 3 x 3 recipients tried in the hour, the node suspends the mailbox.
    codes = [code for code, _ in rcpts(node, "info@example.com", P1, [f"x{i}@internet.test" for i in range(6)])]
    assert codes[:5] == [450] * 5 and codes[5] == 554, codes
    code, msg = rcpts(node, "info@example.com", P1, OUT[:1])[0]
    assert code == 554 and "5.7.1" in msg and "suspended" in msg.lower(), (code, msg)
    # The report tells the server, which records the suspension in the state (one signed commit).
    before = f.head()
    apply(f)
    row = user_row(f, "info@example.com")
    assert row["sending"] == "suspended" and str(row["sending_reason"]).startswith("automatic:"), row
    assert f.head() != before
    log = f.server.git("log", "-1", "--format=%s%n%(trailers:key=Actor,valueonly)")
    assert log.splitlines()[0] == "suspend-sending info@example.com" and "system:sending" in log
    # /metrics counts it (the events thread keeps the suspended ones from the commits).
    deadline = time.monotonic() + 10
    while 'mailstate_mailboxes_sending{state="suspended"} 1.0' not in f.admin.get("/metrics").text:
        assert time.monotonic() < deadline, f.admin.get("/metrics").text[-1500:]
        time.sleep(0.1)
    apply(f)  # the suspension goes live from the state now
    assert rcpts(node, "info@example.com", P1, OUT[:1])[0][0] == 554
    # Still receives, still logs in (IMAP, and SMTP AUTH: the 5xx is at RCPT TO, not at login).
    node.send("info@example.com", "inbound-while-suspended")
    node.wait_for_message("info@example.com", P1, "inbound-while-suspended")
    assert node.can_login("info@example.com", P1)
    # resume-sending: the next tick starts the count afresh, and it can send at once.
    f.call(f.project, "resume-sending", {"email": "info@example.com"})
    apply(f)
    assert node.submit("info@example.com", P1, "info@example.com", OUT[:1], "after-resume") == {}
    node.wait_sink("after-resume")
    apply(f)
    assert user_row(f, "info@example.com")["sending"] == "ok"
    # Refused recipients never reached the internet.
    assert node.sink is not None
    assert not any(r.rcpt_to and r.rcpt_to[0].startswith("x") for r in node.sink.messages)


def test_an_admin_suspension_refuses_every_submission_and_keeps_receiving(limited: Fleet) -> None:
    f, node = limited, limited.node
    f.call(f.project, "suspend-sending", {"email": "bob@example.com", "reason": "password leaked"})
    apply(f)
    for implicit_tls in (False, True):
        with contextlib.closing(node.submission(implicit_tls=implicit_tls)) as s:
            s.login("bob@example.com", P2)  # SMTP AUTH still works
            assert s.mail("bob@example.com")[0] == 250
            code, msg = s.rcpt("someone@internet.test")
            assert code == 554 and b"suspended" in msg.lower(), (code, msg)
            code, _ = s.docmd("DATA")
            assert 500 <= code < 600, code  # no recipient: DATA is refused too
            s.rset()
    # Local recipients too: a suspended mailbox sends to nobody.
    assert rcpts(node, "bob@example.com", P2, ["info@example.com"])[0][0] == 554
    node.send("bob@example.com", "to-suspended-bob")
    node.wait_for_message("bob@example.com", P2, "to-suspended-bob")
    assert user_row(f, "bob@example.com")["sending"] == "suspended"
    assert user_row(f, "bob@example.com")["sending_reason"] == "password leaked"
    # info is not concerned.
    assert node.submit("info@example.com", P1, "info@example.com", OUT[:1], "info-unaffected") == {}
    node.wait_sink("info-unaffected")
    f.call(f.project, "resume-sending", {"email": "bob@example.com"})
    apply(f)
    deadline = time.monotonic() + 5
    while rcpts(node, "bob@example.com", P2, OUT[:1])[0][0] != 250:
        assert time.monotonic() < deadline, "bob cannot send after resume-sending"
        time.sleep(0.2)
