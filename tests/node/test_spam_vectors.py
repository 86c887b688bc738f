"""Spam policies: the compiler's files, the node's verdicts and rspamd's settings the node writes,
held to one table (tests/vectors/spam_lines.json) for the node and the server."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from mailstate.compiler.render import render_domain, render_settings
from mailstate.state.models import DomainFile, Mailbox, Settings, SpamPolicy
from mailstate.state.spam import SPAM_FILE
from mailstate.state.store import Store
from mailstate.state.sync import validate_incoming
from tests.helpers.common import PROJECT_A
from tests.helpers.vectors import VECTORS as VECTOR_DIR

VECTORS = json.loads((VECTOR_DIR / "spam_lines.json").read_text())
HASH = "{BLF-CRYPT}$2b$04$" + "." * 53
FRAGMENT = "rendered/domains/ex/example.com/spam_policy"


def level(node: Any) -> list[Any]:
    return [node.action, node.junk, node.reject]


@pytest.mark.parametrize("case", VECTORS["defaults"]["valid"])
def test_valid_defaults_are_what_the_compiler_writes_and_the_node_reads(
    pipull: ModuleType, case: dict[str, Any]
) -> None:
    text = render_settings(Settings(format=2, spam=case["spam"]))[SPAM_FILE]
    assert text == case["text"].encode()
    assert level(pipull.spampolicy.parse_defaults(text)) == case["node"]


@pytest.mark.parametrize("case", VECTORS["domain"]["valid"])
def test_valid_fragments_are_what_the_compiler_writes_and_the_node_reads(
    pipull: ModuleType, case: dict[str, Any]
) -> None:
    boxes = {
        local: Mailbox(id="20261201-00000" + str(i), password=HASH, quota_mb=10, spam_policy=SpamPolicy(**policy))
        for i, (local, policy) in enumerate(case["mailboxes"].items())
    }
    boxes["zed"] = Mailbox(id="20261201-0000ff", password=HASH, quota_mb=10)  # no policy: no line
    dom = DomainFile(
        domain="example.com",
        email_enabled=True,
        mailboxes=boxes,
        spam_policy=SpamPolicy(**case["domain"]) if case["domain"] else None,
    )
    text = render_domain(dom, Settings(format=2))[FRAGMENT]
    assert text == case["text"].encode()
    parsed = pipull.spampolicy.parse_domain("example.com", text)
    assert {k: level(v) for k, v in parsed.items()} == case["node"]


@pytest.mark.parametrize("text", [c["text"] for c in VECTORS["defaults"]["hostile"]])
def test_the_node_refuses_hostile_defaults(pipull: ModuleType, text: str) -> None:
    with pytest.raises(pipull.errors.Refused):
        pipull.spampolicy.parse_defaults(text.encode())


@pytest.mark.parametrize("text", [c["text"] for c in VECTORS["domain"]["hostile"]])
def test_the_node_refuses_hostile_fragments(pipull: ModuleType, text: str) -> None:
    with pytest.raises(pipull.errors.Refused):
        pipull.spampolicy.parse_domain("example.com", text.encode())


def test_the_server_refuses_every_hostile_file_in_a_commit(mail_store: Store) -> None:
    """Each hostile file, committed (signed, by the store's own key) as the only change: refused."""
    s = mail_store
    s.execute("set-spam-policy", PROJECT_A, {"domain": "example.com", "action": "junk"})  # the fragment exists
    base = s.snapshot
    cases = [(SPAM_FILE, c["text"]) for c in VECTORS["defaults"]["hostile"]]
    cases += [(FRAGMENT, c["text"]) for c in VECTORS["domain"]["hostile"]]
    for path, text in cases:
        tree = s.git.build_tree(base.commit, {path: text.encode("utf-8") or None})
        sha = s.git.commit(tree, base.commit, "hostile\n", s.signer, datetime.now(UTC))
        verdict = validate_incoming(s.git, base, sha)
        assert verdict.problems, (path, text)


def test_rspamd_settings_resolve_each_field_most_specific_first(pipull: ModuleType, tmp_path: Path) -> None:
    sp = pipull.spampolicy
    default = sp.parse_defaults(b"action reject\njunk_score 5\nreject_score 20\n")
    domains = {"example.com": sp.parse_domain("example.com", b"@domain - 4 -\nanna junk - -\nbob off - -\n")}
    text = sp.settings_text(default, domains).decode()
    # anna: junk (never rejects) from the domain's 4; bob: off; the domain: the default's reject at 20
    assert 'rcpt = "anna@example.com";' in text and "priority = high;" in text
    anna = text.split('rcpt = "anna@example.com";')[1].split("}")[0]
    assert 'reject = null; "add header" = 4;' in anna
    bob = text.split('rcpt = "bob@example.com";')[1].split("}")[0]
    assert 'reject = null; "add header" = null;' in bob
    dom = text.split('rcpt = "@example.com";')[1].split("}")[0]
    assert 'reject = 20; "add header" = 4;' in dom and "priority = medium" in text
    assert sp.actions_text(default).endswith(b"reject = 20; add_header = 5; greylist = null; rewrite_subject = null;\n")
    assert sp.actions_text(None).endswith(b"reject = null; add_header = 6; greylist = null; rewrite_subject = null;\n")


SENDERS = "rendered/domains/ex/example.com/sender_rules"


@pytest.mark.parametrize("case", VECTORS["senders"]["valid"])
def test_valid_sender_rules_are_what_the_compiler_writes_and_the_node_reads(
    pipull: ModuleType, case: dict[str, Any]
) -> None:
    boxes = {
        local: Mailbox(id=f"20261201-00000{i}", password=HASH, quota_mb=10, sender_rules=rules)
        for i, (local, rules) in enumerate(case["mailboxes"].items())
    }
    dom = DomainFile(domain="example.com", email_enabled=True, mailboxes=boxes, sender_rules=case["domain"])
    text = render_domain(dom, Settings(format=2))[SENDERS]
    assert text == case["text"].encode()
    assert [list(t) for t in pipull.spampolicy.parse_senders("example.com", text)] == case["node"]


@pytest.mark.parametrize("text", [c["text"] for c in VECTORS["senders"]["hostile"]])
def test_the_node_refuses_hostile_sender_rules(pipull: ModuleType, text: str) -> None:
    with pytest.raises(pipull.errors.Refused):
        pipull.spampolicy.parse_senders("example.com", text.encode())


def test_the_server_refuses_every_hostile_sender_rules_file_in_a_commit(mail_store: Store) -> None:
    s = mail_store
    s.execute("add-sender-rule", PROJECT_A, {"domain": "example.com", "sender": "@spam.test", "action": "block"})
    base = s.snapshot
    for case in VECTORS["senders"]["hostile"]:
        tree = s.git.build_tree(base.commit, {SENDERS: case["text"].encode("utf-8") or None})
        sha = s.git.commit(tree, base.commit, "hostile\n", s.signer, datetime.now(UTC))
        assert validate_incoming(s.git, base, sha).problems, case["name"]


def test_sender_rules_come_first_in_rspamd_settings(pipull: ModuleType) -> None:
    sp = pipull.spampolicy
    senders = {"example.com": sp.parse_senders("example.com", b"@domain block @spam.test\nanna allow boss@x.test\n")}
    text = sp.settings_text(None, {}, senders).decode()
    block = text.split('rcpt = "@example.com";')[1].split("}\n}")[0]
    assert 'from = "@spam.test";' in block and "reject = -1000;" in block and "priority = 9;" in text
    allow = text.split('rcpt = "anna@example.com";')[1].split("}")[0]
    assert 'from = "boss@x.test";' in allow and "want_spam = yes;" in allow and "priority = 10;" in text
