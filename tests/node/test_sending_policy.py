"""The node's outbound policy (pi-pull/pipull/policy.py, sending.py), and one table of verdicts
for the node and the server (tests/vectors/sending_lines.json).

The counting rules run against a real SQLite file with the clock as a seam (a minute is moved,
never slept); the protocol runs over a real socket the way Postfix speaks it (SMTPD_POLICY_README:
attribute lines, an empty line, `action=`), with a policy service restarted on the same
database. Real Postfix asks it in tests/test_sending_e2e.py."""

from __future__ import annotations

import json
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from mailstate.compiler.render import render_domain, render_settings
from mailstate.state import files
from mailstate.state.models import DomainFile, Mailbox, ProjectFile, Settings
from mailstate.state.sending import SENDING_FILE
from mailstate.state.store import Store
from mailstate.state.sync import validate_incoming
from tests.helpers.common import ADMIN, PASSWORD, PROJECT_A
from tests.helpers.vectors import VECTORS as VECTOR_DIR

VECTORS = json.loads((VECTOR_DIR / "sending_lines.json").read_text())
HASH = "{BLF-CRYPT}$2b$04$" + "." * 53


# --- one table, two sides --------------------------------------------------------------------------


@pytest.mark.parametrize("case", VECTORS["defaults"]["valid"], ids=lambda c: c["text"][:30])
def test_valid_defaults_are_what_the_compiler_writes_and_the_node_reads(
    pipull: ModuleType, case: dict[str, Any]
) -> None:
    text = render_settings(Settings(sending=case["sending"]))[SENDING_FILE]
    assert text == case["text"].encode()
    d = pipull.sending.parse_defaults(text)
    assert [d.per_hour, d.per_day, d.factor] == case["node"]


@pytest.mark.parametrize("case", VECTORS["domain"]["valid"], ids=lambda c: c["text"][:30])
def test_valid_domain_fragments_are_what_the_compiler_writes_and_the_node_reads(
    pipull: ModuleType, case: dict[str, Any]
) -> None:
    boxes = {
        local: Mailbox(
            id=f"20260101-00000{i}",
            password=HASH,
            quota_mb=10,
            sending={"suspended": state[0], "changed_at": state[1]},
        )
        for i, (local, state) in enumerate(case["mailboxes"].items())
    }
    dom = DomainFile(domain="example.com", project_id=7, email_enabled=True, limits=case["limits"], mailboxes=boxes)
    project = ProjectFile(project_id=7, limits=case["project_limits"])
    text = render_domain(dom, Settings(), (), project)["rendered/domains/ex/example.com/sending"]
    assert text == case["text"].encode()
    parsed = pipull.sending.parse_domain("example.com", text)
    assert [parsed.per_hour, parsed.per_day, parsed.tokens] == case["node"]


def _hostile(kind: str) -> list[Any]:
    return [pytest.param(c["text"], id=c["name"]) for c in VECTORS[kind]["hostile"]]


@pytest.mark.parametrize("text", _hostile("defaults"))
def test_the_node_refuses_hostile_defaults(pipull: ModuleType, text: str) -> None:
    with pytest.raises(pipull.errors.Refused):
        pipull.sending.parse_defaults(text.encode())


@pytest.mark.parametrize("text", _hostile("domain"))
def test_the_node_refuses_hostile_domain_fragments(pipull: ModuleType, text: str) -> None:
    with pytest.raises(pipull.errors.Refused):
        pipull.sending.parse_domain("example.com", text.encode())


def test_the_server_refuses_every_hostile_file_in_a_commit(mail_store: Store) -> None:
    """Each hostile file, committed (signed, by the store's own key) as the only change: refused."""
    from mailstate.state.snapshot import Change

    s = mail_store
    s.execute("set-limits", ADMIN, {"domain": "example.com", "send_per_hour": 5})
    base = s.snapshot
    cases = [(SENDING_FILE, c["text"]) for c in VECTORS["defaults"]["hostile"]]
    cases += [("rendered/domains/ex/example.com/sending", c["text"]) for c in VECTORS["domain"]["hostile"]]
    for path, text in cases:
        tree = s.git.build_tree(base.commit, {path: text.encode("utf-8") or None})
        sha = s.git.commit(tree, base.commit, "hostile\n", s.signer, datetime.now(UTC))
        verdict = validate_incoming(s.git, base, sha)
        assert verdict.problems, (path, text)
    assert Change  # the store's own writes never produce them (test_valid_* above)


# --- counting --------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1_900_000_000.0

    def __call__(self) -> float:
        return self.t


def policy_dir(tmp_path: Path, domain_text: str, defaults: str | None = None) -> Path:
    d = tmp_path / "policy"
    (d / "domains").mkdir(parents=True)
    (d / "domains" / "example.com").write_text(domain_text)
    if defaults is not None:
        (d / "defaults").write_text(defaults)
    return d


def test_limits_count_recipients_then_suspend_past_the_factor(pipull: ModuleType, tmp_path: Path) -> None:
    p = pipull.policy
    d = policy_dir(tmp_path, "@limits 3 10\n")
    clock = Clock()
    counter = p.Counter(str(d / "counts.sqlite"), clock)
    files_ = p.PolicyFiles(str(d))
    policy = files_.lookup("info@example.com")
    assert (policy.per_hour, policy.per_day, policy.factor) == (3, 10, 3.0)
    # A message to three recipients: each RCPT counts with the message's earlier ones.
    assert [counter.rcpt("info@example.com", policy, n) for n in range(3)] == ["DUNNO"] * 3
    answer = counter.rcpt("info@example.com", policy, 3)
    assert answer.startswith("450 4.7.1") and "3 recipient(s) an hour" in answer
    counter.sent("info@example.com", policy, 3)
    assert counter.rcpt("info@example.com", policy, 0).startswith("450")
    # Another login is not concerned; a new hour frees the window, the day still counts.
    assert counter.rcpt("bob@example.com", files_.lookup("bob@example.com"), 0) == "DUNNO"
    clock.t += 3601
    for _ in range(3):
        assert counter.rcpt("info@example.com", policy, 0) == "DUNNO"
        counter.sent("info@example.com", policy, 1)
    # A third hour: 3 more go, then 4xx; past 3 x 3 recipients tried in the hour (the refused
    # ones included: a hijacked mailbox keeps trying) the node suspends the mailbox: 5xx.
    clock.t += 3601
    answers = []
    for _ in range(20):
        a = counter.rcpt("info@example.com", policy, 0)
        answers.append(a[:3])
        if a == "DUNNO":
            counter.sent("info@example.com", policy, 1)
    assert answers == ["DUN"] * 3 + ["450"] * 6 + ["554"] * 11, answers
    # The service publishes what to report (pending.json); a tick that reported it acknowledges
    # it (acked), and the next publication has only what changed since.
    publisher = p.Publisher(counter, files_, str(d), pipull.log.make_logger())
    assert publisher.round() is True and publisher.round() is False
    pending = p.read_pending(str(d / "pending.json"))
    (mine,) = [e for e in pending["entries"] if e["login"] == "info@example.com"]
    assert mine["state"] == "suspended" and mine["recipients_day"] == 9 and mine["token"] == ""
    assert (mine["recipients_hour"], mine["messages_hour"]) == (3, 3)
    (d / "acked").write_text(f"{pending['seq']}\n")
    assert publisher.round() is True
    after = p.read_pending(str(d / "pending.json"))
    assert after["seq"] == pending["seq"] + 1
    assert not [e for e in after["entries"] if e["login"] == "info@example.com"]
    # The state resumes it (a new token): the counts start afresh, the suspension is gone.
    (d / "domains" / "example.com").write_text("@limits 3 10\ninfo ok 20260301T000000Z\n")
    policy = files_.lookup("info@example.com")
    assert policy.token == "ok 20260301T000000Z"
    assert counter.rcpt("info@example.com", policy, 0) == "DUNNO"
    # A state suspension (suspend-sending) refuses everything, limits or not.
    (d / "domains" / "example.com").write_text("info suspended 20260301T000001Z\n")
    assert counter.rcpt("info@example.com", files_.lookup("info@example.com"), 0).startswith("554 5.7.1")


def test_no_limit_no_count_and_defaults_apply(pipull: ModuleType, tmp_path: Path) -> None:
    p = pipull.policy
    d = policy_dir(
        tmp_path,
        "anna ok 20260101T000000Z\n",
        defaults="send_per_hour none\nsend_per_day 2\nauto_suspend_factor none\n",
    )
    counter = p.Counter(str(d / "counts.sqlite"), Clock())
    files_ = p.PolicyFiles(str(d))
    anna = files_.lookup("anna@example.com")
    assert (anna.per_hour, anna.per_day, anna.factor) == (None, 2, None)
    for _ in range(2):
        assert counter.rcpt("anna@example.com", anna, 0) == "DUNNO"
        counter.sent("anna@example.com", anna, 1)
    # Without a factor the node never suspends: 4xx however often it is tried.
    assert {counter.rcpt("anna@example.com", anna, 0)[:3] for _ in range(50)} == {"450"}
    # A domain without a fragment gets the defaults; an unknown login too.
    assert files_.lookup("x@unknown.org").per_day == 2


def _ask(sock: socket.socket, **attrs: str) -> str:
    sock.sendall(("".join(f"{k}={v}\n" for k, v in attrs.items()) + "\n").encode())
    data = b""
    while not data.endswith(b"\n\n"):
        chunk = sock.recv(4096)
        assert chunk, "the policy service closed the connection"
        data += chunk
    assert data.startswith(b"action=")
    return data[len(b"action=") : -2].decode()


@pytest.mark.e2e
def test_the_protocol_over_a_socket_and_counts_that_survive_a_restart(pipull: ModuleType, tmp_path: Path) -> None:
    p = pipull.policy
    d = policy_dir(tmp_path, "@limits 2 default\n")
    log = pipull.log.make_logger()

    def start() -> tuple[Any, Any]:
        policy = p.Policy(p.PolicyFiles(str(d)), p.Counter(str(d / "counts.sqlite")), log)
        server = p.PolicyServer(("127.0.0.1", 0), policy)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, policy

    server, policy = start()
    base = {"request": "smtpd_access_policy", "sasl_username": "Info@Example.com", "sasl_method": "plain"}
    with socket.create_connection(server.server_address, timeout=5) as s:
        # One connection, one message to two recipients, then its END-OF-MESSAGE.
        assert _ask(s, **base, protocol_state="RCPT", instance="a.1", recipient="x@o.org") == "DUNNO"
        assert _ask(s, **base, protocol_state="RCPT", instance="a.1", recipient="y@o.org") == "DUNNO"
        assert _ask(s, **base, protocol_state="RCPT", instance="a.1", recipient="z@o.org").startswith("450 4.7.1")
        assert _ask(s, **base, protocol_state="END-OF-MESSAGE", instance="a.1", recipient_count="2") == "DUNNO"
        # Unauthenticated requests are not this service's business; junk gets DUNNO too.
        assert _ask(s, request="smtpd_access_policy", protocol_state="RCPT", sasl_username="") == "DUNNO"
        assert _ask(s, hello="world") == "DUNNO"
    server.shutdown()
    server.server_close()
    policy.counter.close()
    # A restarted service on the same database keeps the count: the third recipient is still refused.
    server, policy = start()
    with socket.create_connection(server.server_address, timeout=5) as s:
        assert _ask(s, **base, protocol_state="RCPT", instance="b.1", recipient="x@o.org").startswith("450")
    server.shutdown()
    server.server_close()
    policy.counter.close()


def test_a_project_limit_reaches_the_node_through_each_domain_fragment(mail_store: Store) -> None:
    s = mail_store
    out = s.execute("set-limits", ADMIN, {"project_id": PROJECT_A.project_id, "send_per_hour": 40})
    path = "rendered/domains/ex/example.com/sending"
    assert s.git.read(out.result["commit"], path) == b"@limits 40 default\n"
    s.execute("set-limits", ADMIN, {"domain": "example.com", "send_per_day": 400})
    assert s.git.read(s.head, path) == b"@limits 40 400\n"
    s.execute("suspend-sending", PROJECT_A, {"email": "info@example.com", "reason": "spam"})
    text = s.git.read(s.head, path) or b""
    assert text.startswith(b"@limits 40 400\ninfo suspended ")
    s.execute("set-limits", ADMIN, {"project_id": PROJECT_A.project_id, "send_per_hour": None})
    assert (s.git.read(s.head, path) or b"").startswith(b"@limits default 400\n")
    # The state stays compile()-clean throughout (the same check as `mailstate check`).
    from mailstate.state.load import check_commit

    assert check_commit(s.git, s.head) == []
    s.execute("add-user", PROJECT_A, {"email": "x@example.com", "password": PASSWORD})
    assert files.project_path(PROJECT_A.project_id) not in [p for p, _ in s.git.walk_blobs(s.head, "projects")]
