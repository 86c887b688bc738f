"""Webhooks end to end: a real `mailstate serve` (run with MAILSTATE_WEBHOOK_ALLOW_PRIVATE=1, so
a receiver on loopback is allowed) posting to real HTTP receivers (tests/webhooksink.py) that
verify every Standard Webhooks signature. A retry after a 500 keeps its webhook-id; a delivery
pending when the server stops arrives after it starts again; a project's webhook gets its own
project's events only. A second server, with the default rule, refuses private and bad URLs
over HTTP with a 4xx and registers nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.server import LiveServer, assert_error, live_server
from tests.helpers.webhooksink import webhook_sink

pytestmark = pytest.mark.e2e

API = "/v1/email-account"
PASSWORD = "correct horse battery"


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path)
    server.env.update(MAILSTATE_WEBHOOK_ALLOW_PRIVATE="1", MAILSTATE_DNS_CHECK_INTERVAL="0")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def setup_project(srv: LiveServer, project: int, domain: str) -> Any:
    admin = srv.client(srv.admin_token)
    assert admin.post(f"{API}/link-domain", json={"domain": domain, "project_id": project}).status_code == 201
    client = srv.client(srv.create_token(project=project, name=f"p{project}"))
    assert client.post(f"{API}/enable-email", json={"domain": domain}).status_code == 200
    return client


def add_hook(client: Any, url: str, events: list[str]) -> dict[str, Any]:
    r = client.post(f"{API}/add-webhook", json={"url": url, "events": events})
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def test_signed_events_isolation_and_a_retry_with_the_same_id(srv: LiveServer) -> None:
    a = setup_project(srv, 41, "a.example")
    b = setup_project(srv, 42, "b.example")
    admin = srv.client(srv.admin_token)
    events = ["mailbox.created", "mailbox.deleted", "mailbox.restored", "domain.enabled", "sending.suspended"]
    # Project A's receiver fails its first request with a 500.
    with (
        webhook_sink(answer=lambda n: 500 if n == 1 else 200) as sink_a,
        webhook_sink() as sink_b,
        webhook_sink() as sink_admin,
    ):
        hook_a = add_hook(a, sink_a.url, events)
        hook_b = add_hook(b, sink_b.url, events)
        hook_admin = add_hook(admin, sink_admin.url, [*events, "node.stale"])
        assert a.post(f"{API}/add-user", json={"email": "info@a.example", "password": PASSWORD}).status_code == 201
        got = sink_a.wait(lambda r: len(r) >= 2, timeout=30)
        first, retry = got[0], got[1]
        assert first.status == 500 and retry.status == 200
        assert first.id == retry.id and first.body == retry.body
        assert 3 <= retry.at - first.at <= 60, retry.at - first.at  # the first retry comes within a minute
        assert retry.headers["webhook-timestamp"] != "" and retry.verifies(hook_a["secret"])
        assert not retry.verifies(hook_b["secret"])
        event = retry.event
        assert event["type"] == "mailbox.created"
        assert event["data"]["email"] == "info@a.example" and event["data"]["project_id"] == 41
        assert len(event["data"]["commit"]) == 40
        # The admin's webhook saw it too; project B's saw nothing of A's.
        sink_admin.wait(lambda r: any(x.event["data"].get("email") == "info@a.example" for x in r))
        for step in (
            ("remove-user", {"email": "info@a.example"}),
            ("restore-user", {"email": "info@a.example"}),
            ("suspend-sending", {"email": "info@a.example", "reason": "sent spam"}),
        ):
            assert a.post(f"{API}/{step[0]}", json=step[1]).status_code == 200
        got = sink_a.wait(lambda r: [x.event["type"] for x in r if x.status == 200][-1:] == ["sending.suspended"])
        assert [x.event["type"] for x in got if x.status == 200] == [
            "mailbox.created",
            "mailbox.deleted",
            "mailbox.restored",
            "sending.suspended",
        ]
        assert all(x.verifies(hook_a["secret"]) for x in got)
        suspended = got[-1].event["data"]
        assert suspended["reason"] == "sent spam" and suspended["automatic"] is False
        assert b.post(f"{API}/add-user", json={"email": "info@b.example", "password": PASSWORD}).status_code == 201
        sink_b.wait(lambda r: len(r) == 1)
        sink_admin.wait(lambda r: any(x.event["data"].get("email") == "info@b.example" for x in r))
        assert all(x.event["data"]["project_id"] == 41 for x in sink_a.received)
        assert [x.event["data"]["email"] for x in sink_b.received] == ["info@b.example"]
        # list-webhooks: its own, no secret; the counts.
        mine = a.get(f"{API}/list-webhooks").json()["webhooks"]
        assert [h["id"] for h in mine] == [hook_a["id"]] and "secret" not in mine[0]
        assert mine[0]["last_error"] == "HTTP 500" and mine[0]["last_success_at"]
        # /metrics counts the tries.
        metrics = admin.get("/metrics").text
        assert 'mailstate_webhook_deliveries_total{result="failed"} 1.0' in metrics
        assert "mailstate_webhook_backlog" in metrics
    # No secret in the log, the repo or an answer other than add-webhook's.
    for hook in (hook_a, hook_b, hook_admin):
        assert hook["secret"] not in srv.log_text()
        assert hook["secret"] not in srv.git("log", "-p", "--all")


def test_a_delivery_pending_at_a_stop_arrives_after_the_start(srv: LiveServer) -> None:
    a = setup_project(srv, 41, "a.example")
    with webhook_sink() as probe:
        port = probe.port
    # Nothing listens on `port` now: the first try is refused, and a retry is due in ~5 s.
    hook = add_hook(a, f"http://127.0.0.1:{port}/hook", ["mailbox.created"])
    assert a.post(f"{API}/add-user", json={"email": "late@a.example", "password": PASSWORD}).status_code == 201
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        listed = a.get(f"{API}/list-webhooks").json()["webhooks"][0]
        if listed["last_error"]:
            break
        time.sleep(0.1)
    assert listed["pending"] == 1 and listed["last_error"] == "connection refused", listed
    srv.stop()
    with webhook_sink(port=port) as sink:
        srv.start()
        got = sink.wait(lambda r: len(r) == 1, timeout=60)
        assert got[0].verifies(hook["secret"]) and got[0].event["data"]["email"] == "late@a.example"
        a2 = srv.client(srv.create_token(project=41, name="after"))
        again = a2.get(f"{API}/list-webhooks").json()["webhooks"][0]
        deadline = time.monotonic() + 10
        while again["pending"] and time.monotonic() < deadline:
            time.sleep(0.1)
            again = a2.get(f"{API}/list-webhooks").json()["webhooks"][0]
        assert again["pending"] == 0


def test_hostile_webhook_inputs_are_4xx_and_register_nothing(tmp_path: Path) -> None:
    with live_server(tmp_path) as srv:
        a = setup_project(srv, 41, "a.example")
        cases = [
            ({"url": "http://127.0.0.1:9/x", "events": ["mailbox.created"]}, 400, "invalid_webhook_url"),
            ({"url": "https://127.0.0.1/x", "events": ["mailbox.created"]}, 400, "webhook_url_not_public"),
            ({"url": "https://169.254.169.254/", "events": ["mailbox.created"]}, 400, "webhook_url_not_public"),
            ({"url": "https://localhost/x", "events": ["mailbox.created"]}, 400, "webhook_url_not_public"),
            ({"url": "https://u:p@93.184.215.14/x", "events": ["mailbox.created"]}, 400, "invalid_webhook_url"),
            ({"url": "javascript:alert(1)", "events": ["mailbox.created"]}, 400, "invalid_webhook_url"),
            ({"url": "https://93.184.215.14/x", "events": []}, 400, "invalid_events"),
            ({"url": "https://93.184.215.14/x", "events": ["mail.everything"]}, 400, "invalid_events"),
            ({"url": "https://93.184.215.14/x", "events": ["node.stale"]}, 403, "admin_required"),
            ({"url": "https://93.184.215.14/x", "events": ["mailbox.created"], "secret": "whsec_short"}, 400, None),
            ({"url": "https://93.184.215.14/x" + "a" * 3000, "events": ["mailbox.created"]}, 400, None),
        ]
        for body, status, code in cases:
            r = a.post(f"{API}/add-webhook", json=body)
            err = assert_error(r, status, code)
            assert "whsec_short" not in err["message"]
        assert a.get(f"{API}/list-webhooks").json() == {"webhooks": []}
        assert_error(a.post(f"{API}/remove-webhook", json={"id": "wh_0123456789abcdef"}), 404, "webhook_not_found")
        assert_error(a.post(f"{API}/remove-webhook", json={"id": "../../etc"}), 400, "invalid_webhook_id")
