"""Sending through the whole pipeline: `mailstate serve` → signed commits → pi-pull ticks → REAL
Postfix (submission 587 with STARTTLS, 465 implicit TLS, SASL through Dovecot) and Dovecot (IMAP
over TLS), with the test node's self-signed certificate; the SMTP sink (tests/helpers/smtpsink.py)
stands in for the internet.

Sender ownership (compiler/maplines.py): a login may send as itself, as the aliases that deliver to
it and as those addresses on alias domains; anything else is a 5xx. Nothing is faked.
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import smtplib

import pytest

from tests.helpers.fleet import P1, Fleet
from tests.helpers.mailnode import MailNode
from tests.helpers.pipull import EXIT_OK

pytestmark = pytest.mark.e2e

P2 = "another-long-password-2"


def apply(f: Fleet) -> None:
    r = f.tick()
    assert r.returncode == EXIT_OK, r.stderr


def mail_from_code(
    node: MailNode, user: str, password: str, sender: str, *, implicit_tls: bool = False
) -> tuple[int, str]:
    """The answer to MAIL FROM:<sender> after logging in as ``user`` (then RCPT to the internet)."""
    with contextlib.closing(node.submission(implicit_tls=implicit_tls)) as s:
        s.login(user, password)
        code, msg = s.mail(sender)
        if code == 250:
            code, msg = s.rcpt("someone@internet.test")
        s.rset()
        s.quit()
        return code, msg.decode(errors="replace")


@pytest.fixture
def sending(fleet: Fleet) -> Fleet:
    f = fleet
    f.call(f.admin, "link-domain", {"domain": "example.com", "project_id": 42}, status=201)
    f.call(f.project, "enable-email", {"domain": "example.com"})
    for local, pw in (("info", P1), ("bob", P2)):
        f.call(f.project, "add-user", {"email": f"{local}@example.com", "password": pw}, status=201)
    f.call(f.project, "add-alias", {"address": "sales@example.com", "destinations": ["info@example.com"]}, status=201)
    f.call(f.project, "add-alias", {"address": "@example.com", "destinations": ["bob@example.com"]}, status=201)
    f.call(f.admin, "link-domain", {"domain": "old.example", "project_id": 42}, status=201)
    f.call(f.project, "enable-email", {"domain": "old.example"})
    f.call(f.project, "add-alias-domain", {"domain": "old.example", "target": "example.com"})
    apply(f)
    return f


def test_submission_sends_as_owned_addresses_only(sending: Fleet) -> None:
    f, node = sending, sending.node
    assert node.sink is not None
    # STARTTLS + AUTH as the user, to an external address: the message reaches the internet.
    refused = node.submit("info@example.com", P1, "info@example.com", ["someone@internet.test"], "as-myself")
    assert refused == {}
    got = node.wait_sink("as-myself")
    assert got.mail_from == "info@example.com" and got.rcpt_to == ["someone@internet.test"]
    # As an alias that delivers to the login, and as that alias on the alias domain.
    node.submit("info@example.com", P1, "sales@example.com", ["someone@internet.test"], "as-my-alias")
    assert node.wait_sink("as-my-alias").mail_from == "sales@example.com"
    node.submit("info@example.com", P1, "sales@old.example", ["someone@internet.test"], "as-alias-domain")
    assert node.wait_sink("as-alias-domain").mail_from == "sales@old.example"
    node.submit("info@example.com", P1, "info@old.example", ["someone@internet.test"], "as-me-on-alias-domain")
    node.wait_sink("as-me-on-alias-domain")
    # Implicit TLS on 465 works the same.
    node.submit("bob@example.com", P2, "bob@example.com", ["someone@internet.test"], "over-465", implicit_tls=True)
    node.wait_sink("over-465")
    # Local delivery through submission works too.
    node.submit("bob@example.com", P2, "bob@example.com", ["info@example.com"], "to-a-colleague")
    node.wait_for_message("info@example.com", P1, "to-a-colleague")

    # Another user's address, another user's alias, the catch-all's "addresses", an unknown
    # address, a foreign domain: 5xx (reject_sender_login_mismatch), on 587 and 465.
    for sender in ("bob@example.com", "bob@old.example", "nobody@example.com", "ceo@internet.test"):
        code, msg = mail_from_code(node, "info@example.com", P1, sender)
        assert 500 <= code < 600 and "not owned" in msg, (sender, code, msg)
    code, msg = mail_from_code(node, "bob@example.com", P2, "sales@example.com", implicit_tls=True)
    assert 500 <= code < 600, (code, msg)
    # (Postfix answers at RCPT time: smtpd_delay_reject.)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
        node.submit("bob@example.com", P2, "info@example.com", ["someone@internet.test"], "spoofed")
    assert exc.value.recipients["someone@internet.test"][0] == 553

    # A change of ownership is live after one tick: the alias now goes to bob.
    f.call(f.project, "update-alias", {"address": "sales@example.com", "destinations": ["bob@example.com"]})
    apply(f)
    assert mail_from_code(node, "bob@example.com", P2, "sales@old.example")[0] == 250
    assert 500 <= mail_from_code(node, "info@example.com", P1, "sales@example.com")[0] < 600
    assert node.sink.wait_subject("as-myself") and not any(m.header("Subject") == "spoofed" for m in node.sink.messages)


def test_no_auth_without_tls_and_no_relay_without_auth(sending: Fleet) -> None:
    node = sending.node
    # 587 before STARTTLS: AUTH is not offered and is refused; so is MAIL.
    with contextlib.closing(node.submission(starttls=False)) as s:
        assert "auth" not in s.esmtp_features and "starttls" in s.esmtp_features
        plain = base64.b64encode(f"\0info@example.com\0{P1}".encode()).decode()
        code, _ = s.docmd("AUTH", f"PLAIN {plain}")
        assert 500 <= code < 600, code
        code, _ = s.mail("info@example.com")
        assert code == 530, code  # Must issue a STARTTLS command first
    # Port 25 never offers AUTH, not even over TLS.
    with contextlib.closing(node.smtp()) as s:
        s.starttls(context=node.tls_context())
        s.ehlo("client.test")
        assert "auth" not in s.esmtp_features
        code, _ = s.docmd("AUTH", f"PLAIN {plain}")
        assert 500 <= code < 600, code
    # Unauthenticated relay: refused on 587 over TLS and on 25 (local delivery on 25 still works).
    with contextlib.closing(node.submission()) as s:
        assert "auth" in s.esmtp_features
        s.mail("info@example.com")
        code, _ = s.rcpt("someone@internet.test")
        assert 500 <= code < 600, code
        code, _ = s.rcpt("info@example.com")
        assert 500 <= code < 600, code  # submission is for logged-in users only
    with contextlib.closing(node.smtp()) as s:
        s.mail("stranger@internet.test")
        code, _ = s.rcpt("someone@elsewhere.test")
        assert code == 554 or 500 <= code < 600, code
        assert s.rcpt("info@example.com")[0] == 250
    # A wrong password: 535.
    with contextlib.closing(node.submission()) as s, pytest.raises(smtplib.SMTPAuthenticationError):
        s.login("info@example.com", "wrong-password-here")


def test_imap_needs_tls_and_soft_deleted_cannot_log_in_or_send(sending: Fleet) -> None:
    f, node = sending, sending.node
    # IMAP without TLS: login refused (LOGINDISABLED), even with the right password.
    m = node.imap_plain()
    try:
        assert "LOGINDISABLED" in m.capabilities and "STARTTLS" in m.capabilities
        with pytest.raises(imaplib.IMAP4.error, match=r"(?i)plaintext|disabled|privacy"):
            m.login("info@example.com", P1)
    finally:
        with contextlib.suppress(Exception):
            m.logout()
    assert node.can_login("info@example.com", P1)  # over TLS (993's equivalent)

    # Soft-deleted: no IMAP login, no SMTP AUTH, and its alias's ownership goes.
    f.call(f.project, "remove-user", {"email": "info@example.com"})
    apply(f)
    assert not node.can_login("info@example.com", P1)
    with contextlib.closing(node.submission()) as s, pytest.raises(smtplib.SMTPAuthenticationError):
        s.login("info@example.com", P1)
    assert node.can_login("bob@example.com", P2)
    assert 500 <= mail_from_code(node, "bob@example.com", P2, "info@example.com")[0] < 600
