"""Plan limits over the real surfaces: a live `mailstate serve`, HTTP and the official MCP client.

Concurrent add-users racing for a project's last mailbox slot: exactly one wins, every other
gets 409 limit_reached naming the limit and the use, and exactly one commit lands (the store
serialises writes; bcrypt runs outside its lock, so the requests really overlap)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from tests.helpers.mcp import http_session
from tests.helpers.server import LiveServer, assert_error, live_server

pytestmark = pytest.mark.e2e

API = "/v1/email-account"
PASSWORD = "correct horse battery"
PROJECT = 61


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # bcrypt cost 10 (~60 ms): long enough that the racing requests hash side by side.
    with live_server(tmp_path_factory.mktemp("controls"), bcrypt_cost=10) as server:
        admin = server.client(server.admin_token)
        for domain in ("race.example", "mcp-limits.example"):
            assert admin.post(f"{API}/link-domain", json={"domain": domain, "project_id": PROJECT}).status_code == 201
        server.project_token = server.create_token(project=PROJECT, name="race")  # type: ignore[attr-defined]
        p = server.client(server.project_token)  # type: ignore[attr-defined]
        for domain in ("race.example", "mcp-limits.example"):
            assert p.post(f"{API}/enable-email", json={"domain": domain}).status_code == 200
        yield server


def test_concurrent_add_users_race_for_the_last_slot(srv: LiveServer) -> None:
    admin = srv.client(srv.admin_token)
    p = srv.client(srv.project_token)  # type: ignore[attr-defined]
    for i in range(3):
        assert p.post(f"{API}/add-user", json={"email": f"u{i}@race.example", "password": PASSWORD}).status_code == 201
    r = admin.post(f"{API}/set-limits", json={"project_id": PROJECT, "max_mailboxes": 4})
    assert r.status_code == 200 and r.json()["limits"]["max_mailboxes"] == 4
    before = srv.commit_count()
    barrier = threading.Barrier(8)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def racer(i: int) -> None:
        with srv.client(srv.project_token) as c:  # type: ignore[attr-defined]
            barrier.wait()
            resp = c.post(f"{API}/add-user", json={"email": f"racer{i}@race.example", "password": PASSWORD})
        with lock:
            answers.append(resp)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    codes = sorted(a.status_code for a in answers)
    assert codes == [201] + [409] * 7, [a.text for a in answers]
    for a in answers:
        if a.status_code == 409:
            err = assert_error(a, 409, "limit_reached")
            assert (err["limit"], err["max"], err["use"]) == ("max_mailboxes", 4, 5)
            assert "max_mailboxes" in err["message"] and "project 61" in err["message"].lower()
    assert srv.commit_count() == before + 1
    users = p.get(f"{API}/list-users", params={"domain": "race.example"}).json()["users"]
    assert len([u for u in users if u["active"]]) == 4
    limits = p.get(f"{API}/list-limits", params={"project_id": str(PROJECT)}).json()["limits"]
    assert limits[0]["max_mailboxes"] == {"limit": 4, "use": 4}
    # Lowering the limit below the use is refused; nothing is committed.
    low = admin.post(f"{API}/set-limits", json={"project_id": PROJECT, "max_mailboxes": 2})
    err = assert_error(low, 409, "limit_below_use")
    assert (err["max"], err["use"]) == (2, 4)
    assert srv.commit_count() == before + 1
    # Bad limits are 400s and commit nothing.
    for body in (
        {"project_id": PROJECT, "max_mailboxes": -1},
        {"project_id": PROJECT, "max_mailboxes": "4"},
        {"project_id": PROJECT, "storage_mb": 1.5},
        {"max_mailboxes": 3},
        {"project_id": PROJECT, "max_mailbox": 3},
    ):
        assert admin.post(f"{API}/set-limits", json=body).status_code == 400, body
    assert_error(p.post(f"{API}/set-limits", json={"project_id": PROJECT, "max_mailboxes": 99}), 403, "admin_required")
    assert srv.commit_count() == before + 1
    # Clean up for the MCP test: no mailbox limit.
    assert admin.post(f"{API}/set-limits", json={"project_id": PROJECT, "max_mailboxes": None}).status_code == 200


def test_limits_over_mcp_answer_what_http_answers(srv: LiveServer) -> None:
    admin = srv.client(srv.admin_token)
    assert admin.post(f"{API}/set-limits", json={"domain": "mcp-limits.example", "max_mailboxes": 1}).status_code == 200

    async def main() -> list[Any]:
        out = []
        async with http_session(srv, srv.project_token) as s:  # type: ignore[attr-defined]
            for i in range(2):
                body = {"email": f"m{i}@mcp-limits.example", "password": PASSWORD}
                out.append(await s.call_tool("email_account_add_user", body))
            out.append(await s.call_tool("email_account_list_limits", {"domain": "mcp-limits.example"}))
        async with http_session(srv, srv.admin_token) as s:
            out.append(
                await s.call_tool("email_account_set_limits", {"domain": "mcp-limits.example", "max_mailboxes": 0})
            )
        return out

    first, second, listed, lowered = anyio.run(main)
    assert first.is_error is False and second.is_error is True
    err = json.loads(second.content[0].text)["error"]
    assert (err["code"], err["limit"], err["max"], err["use"]) == ("limit_reached", "max_mailboxes", 1, 2)
    # The same call over HTTP answers the same body.
    http = srv.client(srv.project_token).post(  # type: ignore[attr-defined]
        f"{API}/add-user", json={"email": "m1@mcp-limits.example", "password": PASSWORD}
    )
    assert http.status_code == 409 and http.json()["error"] == err
    entries = json.loads(listed.content[0].text)["limits"]
    assert [(e["project_id"], e["domain"]) for e in entries] == [(PROJECT, None), (PROJECT, "mcp-limits.example")]
    assert entries[1]["max_mailboxes"] == {"limit": 1, "use": 1}
    assert json.loads(lowered.content[0].text)["error"]["code"] == "limit_below_use"
