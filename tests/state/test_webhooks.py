"""Webhooks without a server process: the URL rule, the Standard Webhooks signature (against the
spec's own example), the registry's scoping, events read off commits, and the dispatcher's
retries, 24-hour give-up and restart safety driven through its clock seam against a real
HTTP receiver on loopback (tests/webhooksink.py)."""

from __future__ import annotations

import itertools
import random
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailstate.state.delivery import GIVE_UP_AFTER, RETRY_DELAYS, Dispatcher, Poster
from mailstate.state.errors import Forbidden, InvalidInput, NotFound
from mailstate.state.events import CommitEvents, domain_events
from mailstate.state.store import Store
from mailstate.state.webhooks import Event, Webhooks, check_url, secret_key, sign, verify
from tests.helpers.common import ADMIN, PASSWORD, PROJECT_A, PROJECT_B
from tests.helpers.webhooksink import webhook_sink

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def test_the_signature_is_standard_webhooks() -> None:
    # The example of the Standard Webhooks spec (and its reference libraries' tests).
    secret, msg, ts, body = (
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert sign(secret, msg, ts, body) == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert verify(secret, msg, str(ts), body, "v1,bad v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
    assert not verify(secret, msg, str(ts), body + b" ", "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://93.184.215.14/h", "invalid_webhook_url"),  # http needs MAILSTATE_WEBHOOK_ALLOW_PRIVATE=1
        ("ftp://93.184.215.14/h", "invalid_webhook_url"),
        ("https://user:pw@93.184.215.14/h", "invalid_webhook_url"),
        ("https://93.184.215.14:99999/h", "invalid_webhook_url"),
        ("https:///nohost", "invalid_webhook_url"),
        ("https://exa mple.com/", "invalid_webhook_url"),
        ("https://ex_ample.com/", "invalid_webhook_url"),
        ("https://127.0.0.1/h", "webhook_url_not_public"),
        ("https://10.1.2.3/h", "webhook_url_not_public"),
        ("https://192.168.1.1/h", "webhook_url_not_public"),
        ("https://169.254.169.254/latest/meta-data", "webhook_url_not_public"),  # cloud metadata
        ("https://100.64.0.1/h", "webhook_url_not_public"),
        ("https://[::1]/h", "webhook_url_not_public"),
        ("https://[::ffff:10.0.0.1]/h", "webhook_url_not_public"),
        ("https://[fd00::1]/h", "webhook_url_not_public"),
        ("https://0.0.0.0/h", "webhook_url_not_public"),
        ("https://localhost/h", "webhook_url_not_public"),
        ("https://api.localhost/h", "webhook_url_not_public"),
        ("https://internal.example.net/h", "webhook_url_not_public"),  # resolves to 10.0.0.7 (the fake resolver)
    ],
)
def test_the_url_rule_refuses(url: str, code: str) -> None:
    def resolver(host: str, port: int) -> list[str]:
        return {"internal.example.net": ["93.184.215.14", "10.0.0.7"]}.get(host, [])

    with pytest.raises(InvalidInput) as exc:
        check_url(url, private_ok=False, resolver=resolver)
    assert exc.value.code == code, exc.value.to_dict()


def test_the_url_rule_takes_public_https_and_private_only_when_allowed() -> None:
    for url in ("https://93.184.215.14/h", "https://hooks.example.net:8443/x?y=1", "https://[2606:4700::1]/h"):
        check_url(url, private_ok=False, resolver=lambda h, p: ["93.184.215.14"])
    for url in ("http://127.0.0.1:8080/h", "https://10.0.0.5/h", "http://localhost/h"):
        check_url(url, private_ok=True, resolver=lambda h, p: ["127.0.0.1"])


def test_secrets_are_whsec_base64_of_24_to_64_bytes() -> None:
    assert len(secret_key("whsec_" + "A" * 32)) == 24
    for bad in ("whsec_" + "A" * 28, "whsec_!!!!" * 8, "sk_" + "A" * 32, "whsec_" + "A" * 92):
        with pytest.raises(InvalidInput):
            secret_key(bad)


def test_registry_scoping_and_the_operations(mail_store: Store) -> None:
    s = mail_store
    add = {"url": "https://93.184.215.14/a", "events": ["mailbox.created"]}
    a = s.execute("add-webhook", PROJECT_A, add)
    assert a.created and a.result["secret"].startswith("whsec_") and a.result["project_id"] == PROJECT_A.project_id
    with pytest.raises(Forbidden):
        s.execute("add-webhook", PROJECT_A, {**add, "events": ["node.stale"]})
    admin = s.execute("add-webhook", ADMIN, {**add, "events": ["node.stale", "mailbox.created"]})
    own = s.execute("add-webhook", PROJECT_B, {**add, "secret": "whsec_" + "B" * 32})
    assert own.result["secret"] == "whsec_" + "B" * 32
    listed = s.execute("list-webhooks", PROJECT_A, {}).result["webhooks"]
    assert [h["id"] for h in listed] == [a.result["id"]] and "secret" not in listed[0]
    assert len(s.execute("list-webhooks", ADMIN, {}).result["webhooks"]) == 3
    with pytest.raises(NotFound):
        s.execute("remove-webhook", PROJECT_A, {"id": own.result["id"]})
    assert s.execute("remove-webhook", ADMIN, {"id": admin.result["id"]}).result["removed"] is True
    for body, code in (
        ({**add, "events": []}, "invalid_events"),
        ({**add, "events": ["mailbox.created", "mailbox.created"]}, "invalid_events"),
        ({**add, "events": ["mailbox.exploded"]}, "invalid_events"),
        ({**add, "secret": "hunter2"}, "invalid_webhook_secret"),
        ({**add, "url": "https://10.0.0.1/x"}, "webhook_url_not_public"),
    ):
        with pytest.raises(InvalidInput) as exc:
            s.execute("add-webhook", PROJECT_A, body)
        assert exc.value.code == code
        assert "hunter2" not in exc.value.message


def test_events_read_off_a_domain_change(mail_store: Store) -> None:
    s = mail_store
    before = s.snapshot.domains["example.com"]
    s.execute("add-user", PROJECT_A, {"email": "new@example.com", "password": PASSWORD})
    s.execute("remove-user", PROJECT_A, {"email": "info@example.com"})
    s.execute("suspend-sending", PROJECT_A, {"email": "new@example.com", "reason": "spam run"})
    after = s.snapshot.domains["example.com"]
    got = [(e.type, e.data["email"]) for e in domain_events(before, after, NOW, "c0ffee")]
    assert got == [
        ("mailbox.deleted", "info@example.com"),
        ("mailbox.created", "new@example.com"),
        ("sending.suspended", "new@example.com"),
    ]
    assert next(e.type for e in domain_events(None, after, NOW, "x")) == "domain.enabled"
    assert [e.type for e in domain_events(after, None, NOW, "x")][-1] == "domain.disabled"
    assert all(e.project_id == PROJECT_A.project_id for e in domain_events(before, after, NOW, "x"))


def _hooks(store: Store, url: str, events: list[str], project: int | None = None) -> tuple[Webhooks, str]:
    assert store.webhooks is not None
    hooks = Webhooks(store.git.path.parent / "mailstate.db", private_ok=True)
    found = hooks.add_hook(project, url, events, None, NOW)
    return hooks, found["secret"]


@pytest.mark.e2e
def test_commits_become_signed_deliveries_in_order_and_exactly_once(mail_store: Store) -> None:
    s = mail_store
    with webhook_sink() as sink:
        hooks, secret = _hooks(s, sink.url, ["mailbox.created", "mailbox.deleted"], PROJECT_A.project_id)
        events = CommitEvents(s, hooks)
        s.execute("add-user", PROJECT_A, {"email": "one@example.com", "password": PASSWORD})
        s.execute("remove-user", PROJECT_A, {"email": "one@example.com", "hard_delete": True})
        # A commit made elsewhere (here: straight to git) is found through git, after the cursor.
        from mailstate.state.snapshot import Change

        dom = s.snapshot.domains["example.com"]
        gone = dom.model_copy(update={"mailboxes": {}})
        s.commit_change(Change(domains={"example.com": gone}), "test: by hand\n")
        assert events.round() == 3 and events.round() == 0
        stop = threading.Event()
        d = Dispatcher(hooks)
        runner = threading.Thread(target=d.run, args=(stop,), daemon=True)
        runner.start()
        try:
            got = sink.wait(lambda r: len(r) == 3)
        finally:
            stop.set()
            d.wake()
            runner.join(timeout=15)
        assert [(r.event["type"], r.event["data"]["email"]) for r in got] == [
            ("mailbox.created", "one@example.com"),
            ("mailbox.deleted", "one@example.com"),
            ("mailbox.deleted", "info@example.com"),
        ]
        assert all(r.verifies(secret) for r in got) and len({r.id for r in got}) == 3
        assert hooks.backlog() == 0
        # A restart of the event source picks up from the kept cursor: nothing again.
        assert CommitEvents(s, hooks).round() == 0


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.e2e
def test_retries_keep_the_id_back_off_and_give_up_after_24_hours(tmp_path: Path) -> None:
    clock = Clock()
    with webhook_sink(answer=lambda n: 500) as sink:
        hooks = Webhooks(tmp_path / "db.sqlite", private_ok=True)
        hooks.add_hook(None, sink.url, ["node.stale"], None, NOW)
        hooks.enqueue([Event("node.stale", None, {"node": "n1"})], now=clock.t)
        d = Dispatcher(hooks, clock=clock, rng=random.Random(1))
        waits = []
        while hooks.backlog():
            (delivery,) = hooks.due(clock.t, 10)
            d.attempt(delivery)
            nxt = hooks.next_due()
            if nxt is None:
                break
            waits.append(nxt - clock.t)
            clock.t = nxt
        ids = {r.id for r in sink.received}
        assert len(ids) == 1 and len(sink.received) == len(waits) + 1
        assert 4 <= waits[0] <= 6, waits  # the first retry within a minute
        # Backing off, the last wait cut to end at 24 hours after the event.
        assert all(b >= a * 0.6 for a, b in itertools.pairwise(waits[:-1])), waits
        assert sum(waits) == pytest.approx(GIVE_UP_AFTER, abs=1.0)
        assert d.counters.given_up == 1 and d.counters.delivered == 0
        assert hooks.list_hooks(None)[0]["last_error"].startswith("HTTP 500")


@pytest.mark.e2e
def test_a_pending_delivery_survives_a_restart_of_the_dispatcher(tmp_path: Path) -> None:
    with webhook_sink(answer=lambda n: 503 if n == 1 else 204) as sink:
        db = tmp_path / "db.sqlite"
        hooks = Webhooks(db, private_ok=True)
        secret = hooks.add_hook(None, sink.url, ["node.recovered"], None, NOW)["secret"]
        hooks.enqueue([Event("node.recovered", None, {"node": "n1"})])
        clock = Clock()
        clock.t = hooks.next_due() or 0
        first = Dispatcher(hooks, clock=clock)
        (delivery,) = hooks.due(clock.t, 10)
        assert first.attempt(delivery) is False
        hooks.close()
        # A new process: a new connection to the same database, a new dispatcher.
        again = Webhooks(db, private_ok=True)
        clock.t = (again.next_due() or 0) + 0.1
        (delivery,) = again.due(clock.t, 10)
        assert Dispatcher(again, clock=clock).attempt(delivery) is True
        assert [r.status for r in sink.received] == [503, 204]
        assert sink.received[0].id == sink.received[1].id and sink.received[1].verifies(secret)
        assert again.backlog() == 0


@pytest.mark.e2e
def test_a_hanging_receiver_holds_up_nothing_else(tmp_path: Path) -> None:
    with webhook_sink(hang=30) as slow, webhook_sink() as fast:
        hooks = Webhooks(tmp_path / "db.sqlite", private_ok=True)
        hooks.add_hook(None, slow.url, ["node.stale"], None, NOW)
        hooks.add_hook(None, fast.url, ["node.stale"], None, NOW)
        stop = threading.Event()
        d = Dispatcher(hooks, timeout=2.0, workers=4)
        runner = threading.Thread(target=d.run, args=(stop,), daemon=True)
        runner.start()
        try:
            hooks.enqueue([Event("node.stale", None, {"node": f"n{i}"}) for i in range(10)])
            got = fast.wait(lambda r: len(r) == 10, timeout=20)
            assert {r.event["data"]["node"] for r in got} == {f"n{i}" for i in range(10)}
            # The hanging one holds one worker at a time, each try cut off by the timeout.
            assert 1 <= len(slow.received) <= 10
        finally:
            stop.set()
            d.wake()
            runner.join(timeout=15)
        assert d.counters.failed >= 1


def test_the_poster_refuses_a_name_that_turns_private(tmp_path: Path) -> None:
    hooks = Webhooks(tmp_path / "db.sqlite", private_ok=False, resolver=lambda h, p: ["93.184.215.14"])
    hooks.add_hook(None, "https://hooks.example.net/x", ["node.stale"], None, NOW)
    hooks.enqueue([Event("node.stale", None, {"node": "n"})])
    (delivery,) = hooks.due(1e12, 10)
    calls: list[Any] = []
    rebound = Poster(private_ok=False, resolver=lambda h, p: calls.append(h) or ["127.0.0.1"])
    d = Dispatcher(hooks, post=rebound)
    assert d.attempt(delivery) is False and calls == ["hooks.example.net"]
    assert "not public" in (hooks.list_hooks(None)[0]["last_error"] or "")
    assert RETRY_DELAYS[0] <= 60


# --- the other event sources ---------------------------------------------------------------------------


def _outbox(hooks: Webhooks) -> list[dict[str, Any]]:
    import json

    return [json.loads(d.body) for d in hooks.due(1e12, 1000)]


def test_reports_make_quota_and_sending_events_once_per_crossing(mail_store: Store) -> None:
    from mailstate.state.events import ReportEvents
    from mailstate.state.localdb import LocalDB
    from mailstate.state.nodes import record_report

    s = mail_store
    s.execute("add-node", ADMIN, {"name": "n1"})
    s.execute("set-quota", PROJECT_A, {"email": "info@example.com", "quota_mb": 10})
    hooks, _ = _hooks(s, "https://93.184.215.14/x", ["quota.threshold", "sending.limited", "sending.suspended"])
    listener = ReportEvents(s, hooks)
    db = LocalDB(s.git.path.parent / "mailstate.db")
    box = s.snapshot.domains["example.com"].mailboxes["info"]

    def report(used_mb: float, state: str = "ok", token: str = "") -> None:
        usage = [{"email": "info@example.com", "id": box.id, "used_bytes": int(used_mb * 1048576), "messages": 1}]
        figures = dict.fromkeys(
            ("messages_hour", "recipients_hour", "messages_day", "recipients_day", "refused_hour"), 1
        )
        sending = [{"login": "info@example.com", "state": state, "token": token, **figures}]
        body = {"status": "ok", "usage": usage, "sending": sending}
        record_report(db, s.snapshot, "n1", body, None, datetime.now(UTC), listener)

    for used in (1, 8.5, 9, 10.5, 10.6, 2, 8.1):
        report(used)
    got = [(e["type"], e["data"].get("percent")) for e in _outbox(hooks)]
    # 80 %, 100 %, back under 80 % (no event), 80 % again.
    assert got == [("quota.threshold", 80), ("quota.threshold", 100), ("quota.threshold", 80)]
    assert all(e["data"]["project_id"] == PROJECT_A.project_id for e in _outbox(hooks))
    report(8.1, state="limited")
    report(8.1, state="limited")
    assert [e["type"] for e in _outbox(hooks)][-1:] == ["sending.limited"]
    assert len([e for e in _outbox(hooks) if e["type"] == "sending.limited"]) == 1
    # A node's own suspension is recorded in the state by the system, which makes sending.suspended.
    head = s.head
    report(8.1, state="suspended")
    assert s.head != head
    box = s.snapshot.domains["example.com"].mailboxes["info"]
    assert box.sending is not None and box.sending.suspended and (box.sending.reason or "").startswith("automatic:")
    # A late report under the old token (a resume crossed it) suspends nothing again.
    s.execute("resume-sending", PROJECT_A, {"email": "info@example.com"})
    head = s.head
    report(8.1, state="ok")
    report(8.1, state="suspended", token="")
    assert s.head == head
    db.close()


def test_node_stale_and_recovered_by_the_list_nodes_rule(mail_store: Store) -> None:
    from mailstate.state.events import NodeEvents
    from mailstate.state.localdb import LocalDB
    from mailstate.state.nodes import record_report

    s = mail_store
    s.execute("add-node", ADMIN, {"name": "n1"})
    s.execute("add-node", ADMIN, {"name": "quiet"})  # never reported: no event either way
    hooks, _ = _hooks(s, "https://93.184.215.14/x", ["node.stale", "node.recovered"])
    db = LocalDB(s.git.path.parent / "mailstate.db")
    now = [datetime.now(UTC).replace(microsecond=0)]
    events = NodeEvents(s, hooks, clock=lambda: now[0])
    record_report(db, s.snapshot, "n1", {"status": "ok"}, None, now[0])
    assert events.round() == 0  # fresh at first sight: nothing to say
    now[0] += timedelta(minutes=15)  # 15 minutes of silence: past the 600 s rule
    assert events.round() == 1 and events.round() == 0
    record_report(db, s.snapshot, "n1", {"status": "ok"}, None, now[0])
    assert events.round() == 1
    record_report(db, s.snapshot, "n1", {"status": "stale", "error": "old statement"}, None, now[0])
    assert events.round() == 1  # a node reporting stale is stale too
    assert [(e["type"], e["data"]["node"]) for e in _outbox(hooks)] == [
        ("node.stale", "n1"),
        ("node.recovered", "n1"),
        ("node.stale", "n1"),
    ]
    assert all(e["data"]["project_id"] is None for e in _outbox(hooks))
    # Kept across a restart: a new watcher does not repeat the last event.
    assert NodeEvents(s, hooks, clock=lambda: now[0]).round() == 0
    db.close()


def test_the_dns_check_seam_fires_dns_check_failed_on_the_way_down_only(mail_store: Store) -> None:
    from mailstate.state.dnscheck import DnsChecker

    s = mail_store
    hooks, _ = _hooks(s, "https://93.184.215.14/x", ["dns.check_failed"], PROJECT_A.project_id)
    check = s.dns_check_source
    checker = getattr(check, "__self__", None)
    assert isinstance(checker, DnsChecker)  # open_store wired the checker's failure hook
    records = [{"type": "MX", "name": "example.com", "status": "missing"}, {"type": "TXT", "name": "x", "status": "ok"}]
    checker.on_failure("example.com", records, None)  # the first check, failing
    checker.on_failure("example.com", records, False)  # still failing an hour later: no event
    checker.on_failure("example.com", records, True)  # ok before, failing now
    got = _outbox(hooks)
    assert [e["type"] for e in got] == ["dns.check_failed"] * 2
    assert got[0]["data"]["records"] == [{"type": "MX", "name": "example.com", "status": "missing", "purpose": None}]
    assert got[0]["data"]["project_id"] == PROJECT_A.project_id
