"""Vacation, filters and app passwords through a real `mailstate serve`: each operation is an
HTTP route and an MCP tool (the official client, streamable HTTP at /mcp) answering the same
thing, with the limits as 400s in the one error shape, and no secret in the server's log."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from mailstate.state.models import RESPONSES
from tests.helpers.mcp import body_of, http_session
from tests.helpers.server import LiveServer, assert_error, live_server

pytestmark = pytest.mark.e2e

API = "/v1/email-account"
PASSWORD = "correct horse battery"
BOX = "anna@owners.example"
OWNER_OPS = (
    "set-vacation",
    "set-filters",
    "list-filters",
    "add-app-password",
    "list-app-passwords",
    "remove-app-password",
)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str]]:
    with live_server(tmp_path_factory.mktemp("owners")) as server:
        token = server.create_token(project=5, name="owners")
        with server.client(server.admin_token) as admin, server.client(token) as c:
            assert (
                admin.post(f"{API}/link-domain", json={"domain": "owners.example", "project_id": 5}).status_code == 201
            )
            assert c.post(f"{API}/enable-email", json={"domain": "owners.example"}).status_code == 200
            for email in (BOX, "mcp@owners.example"):
                assert c.post(f"{API}/add-user", json={"email": email, "password": PASSWORD}).status_code == 201
        yield server, token


def test_every_owner_operation_over_http(srv: tuple[LiveServer, str]) -> None:
    server, token = srv
    with server.client(token) as c:
        r = c.post(f"{API}/set-vacation", json={"email": BOX, "enabled": True, "body": "Away.", "end": "2099-01-31"})
        assert r.status_code == 200 and r.json()["commit"], r.text
        RESPONSES["set-vacation"].model_validate(r.json())
        users = c.get(f"{API}/list-users", params={"domain": "owners.example"}).json()["users"]
        assert {u["email"]: u["vacation"] for u in users}[BOX] == {"enabled": True, "start": None, "end": "2099-01-31"}
        rules = [
            {
                "name": "bills",
                "field": "subject",
                "op": "contains",
                "value": 'say "hi" \\o/',
                "action": "fileinto",
                "target": "Bills",
            }
        ]
        r = c.post(f"{API}/set-filters", json={"email": BOX, "filters": rules})
        assert r.status_code == 200, r.text
        listed = c.get(f"{API}/list-filters", params={"email": BOX})
        assert listed.json() == {"filters": [{**rules[0], "stop": False}]}
        RESPONSES["list-filters"].model_validate(listed.json())
        r = c.post(f"{API}/add-app-password", json={"email": BOX, "name": "Thunderbird", "scopes": ["imap", "smtp"]})
        assert r.status_code == 201 and r.headers["cache-control"] == "no-store", r.text
        password = r.json()["password"]
        RESPONSES["add-app-password"].model_validate(r.json())
        apps = c.get(f"{API}/list-app-passwords", params={"email": BOX}).json()["app_passwords"]
        assert [(a["name"], a["scopes"], a["last_used_at"]) for a in apps] == [("Thunderbird", ["imap", "smtp"], None)]
        assert password not in c.get(f"{API}/list-app-passwords", params={"email": BOX}).text
        r = c.post(f"{API}/remove-app-password", json={"email": BOX, "name": "Thunderbird"})
        assert r.status_code == 200 and r.json()["removed"] is True
        assert password not in server.log_text() and password not in server.git("log", "-p", "--all")


@pytest.mark.parametrize(
    "op, body, code, needle",
    [
        ("set-vacation", {"email": BOX, "enabled": True, "body": "x" * 16385}, "invalid_vacation", "16384 bytes"),
        ("set-vacation", {"email": BOX, "enabled": True, "body": "x", "subject": "s" * 201}, "invalid_vacation", "200"),
        ("set-filters", {"email": BOX, "filters": [{"name": "n", "field": "subject", "op": "is", "value": "v", "action": "discard"}] * 51}, "too_many_filters", "50"),
        ("set-filters", {"email": BOX, "filters": [{"name": "n", "field": "subject", "op": "is", "value": "v", "action": "fileinto", "target": "a/../b"}]}, "invalid_folder", ".."),
        ("add-app-password", {"email": BOX, "name": "x", "scopes": ["pop3"]}, "invalid_scopes", "imap"),
    ],
)  # fmt: skip
def test_limits_are_400s_without_a_commit(
    srv: tuple[LiveServer, str], op: str, body: dict[str, Any], code: str, needle: str
) -> None:
    server, token = srv
    before = server.commit_count()
    with server.client(token) as c:
        err = assert_error(c.post(f"{API}/{op}", json=body), 400, code)
    assert needle in err["message"]
    assert server.commit_count() == before


def test_the_mcp_tools_are_the_same_operations(srv: tuple[LiveServer, str]) -> None:
    server, token = srv

    async def main() -> dict[str, Any]:
        async with http_session(server, token) as s:
            tools = {t.name for t in (await s.list_tools()).tools}
            assert {"email_account_" + op.replace("-", "_") for op in OWNER_OPS} <= tools
            out: dict[str, Any] = {}
            out["vacation"] = body_of(
                await s.call_tool(
                    "email_account_set_vacation",
                    {"email": "mcp@owners.example", "enabled": True, "body": "Gone fishing."},
                )
            )
            out["filters"] = body_of(
                await s.call_tool(
                    "email_account_set_filters",
                    {
                        "email": "mcp@owners.example",
                        "filters": [
                            {
                                "name": "x",
                                "field": "to",
                                "op": "contains",
                                "value": "list",
                                "action": "mark_read",
                                "stop": True,
                            }
                        ],
                    },
                )
            )
            out["listed"] = body_of(await s.call_tool("email_account_list_filters", {"email": "mcp@owners.example"}))
            out["app"] = body_of(
                await s.call_tool(
                    "email_account_add_app_password",
                    {"email": "mcp@owners.example", "name": "phone", "scopes": ["imap"]},
                )
            )
            out["apps"] = body_of(
                await s.call_tool("email_account_list_app_passwords", {"email": "mcp@owners.example"})
            )
            bad = await s.call_tool(
                "email_account_add_app_password", {"email": "mcp@owners.example", "name": "PHONE", "scopes": ["imap"]}
            )
            assert bad.is_error
            out["bad"] = body_of(bad)
            out["removed"] = body_of(
                await s.call_tool("email_account_remove_app_password", {"email": "mcp@owners.example", "name": "phone"})
            )
            return out

    out = anyio.run(main)  # fmt: skip
    assert out["vacation"]["vacation"]["enabled"] is True and out["vacation"]["commit"]
    assert out["listed"]["filters"] == out["filters"]["filters"]
    assert len(out["app"]["password"]) == 29 and out["apps"]["app_passwords"][0]["name"] == "phone"
    assert out["bad"]["error"]["code"] == "app_password_name_taken"
    assert out["removed"]["removed"] is True
    # The HTTP twin sees what the tools wrote.
    with server.client(token) as c:
        users = {u["email"]: u["vacation"] for u in c.get(f"{API}/list-users").json()["users"]}
    assert users["mcp@owners.example"]["enabled"] is True
