"""MCP with the official SDK's client: streamable HTTP at /mcp (bearer tokens) and stdio
(`mailstate mcp`). The tool list is exactly the spec's table; each tool is called once; an error
is a tool error carrying the same code and message as the HTTP body."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

from mailstate.api.mcp_server import TOOLS, security_settings, tool_list
from mailstate.state.models import RESPONSES
from mailstate.state.ops import OPERATIONS
from tests.helpers.mcp import body_of, http_session, stdio_session
from tests.helpers.server import LiveServer, assert_error, live_server

pytestmark = pytest.mark.e2e

API = "/v1/email-account"
PASSWORD = "correct horse battery"

# The spec's "MCP Tool Names" table, verbatim.
SPEC_TOOLS = {
    "enable-email": "email_account_enable_email",
    "disable-email": "email_account_disable_email",
    "list-domains": "email_account_list_domains",
    "add-user": "email_account_add_user",
    "remove-user": "email_account_remove_user",
    "restore-user": "email_account_restore_user",  # mailbox lifecycle
    "list-users": "email_account_list_users",
    "update-password": "email_account_update_password",
    "add-domain": "email_account_add_domain",
    "remove-domain": "email_account_remove_domain",
    "list-nodes": "email_account_list_nodes",
    "add-node": "email_account_add_node",
    # aliases, forwarding, catch-all, alias domains
    "add-alias": "email_account_add_alias",
    "update-alias": "email_account_update_alias",
    "remove-alias": "email_account_remove_alias",
    "list-aliases": "email_account_list_aliases",
    "set-forwarding": "email_account_set_forwarding",
    "add-alias-domain": "email_account_add_alias_domain",
    "remove-alias-domain": "email_account_remove_alias_domain",
    "dns-records": "email_account_dns_records",
    # onboarding: the live DNS check and the Apple profile
    "check-dns": "email_account_check_dns",
    "mobileconfig": "email_account_mobileconfig",
    # what mailbox owners ask for
    "set-vacation": "email_account_set_vacation",
    "set-filters": "email_account_set_filters",
    "list-filters": "email_account_list_filters",
    "add-app-password": "email_account_add_app_password",
    "list-app-passwords": "email_account_list_app_passwords",
    "remove-app-password": "email_account_remove_app_password",
    # platform controls: plan limits, sending, webhooks
    "set-limits": "email_account_set_limits",
    "list-limits": "email_account_list_limits",
    "set-quota": "email_account_set_quota",
    "set-spam-policy": "email_account_set_spam_policy",
    "add-sender-rule": "email_account_add_sender_rule",
    "list-sender-rules": "email_account_list_sender_rules",
    "remove-sender-rule": "email_account_remove_sender_rule",
    "list-spam-policy": "email_account_list_spam_policy",
    "suspend-sending": "email_account_suspend_sending",
    "resume-sending": "email_account_resume_sending",
    "add-webhook": "email_account_add_webhook",
    "list-webhooks": "email_account_list_webhooks",
    "remove-webhook": "email_account_remove_webhook",
    # one fleet, one mail service: homes and moves
    "move-domain": "email_account_move_domain",
    "set-node-address": "email_account_set_node_address",
    "set-replica": "email_account_set_replica",
    "failover-node": "email_account_failover_node",
}


LINKS = (("mcp.example", 303), ("other.example", 404))


class Env:
    """The same small world, either behind a live server (HTTP) or in a data dir that only
    `mailstate mcp` (stdio) opens, set up with the CLI."""

    def __init__(self, srv: LiveServer, *, live: bool) -> None:
        self.srv = srv
        if not live:
            srv.cli("init", "--data", str(srv.data.root), "--bcrypt-cost", "4")
            srv.admin_token = srv.create_token(name="admin")
        self.project = srv.create_token(project=303, name="mcp-project")
        self.other = srv.create_token(project=404, name="mcp-other")
        data = str(srv.data.root)
        if live:
            with srv.client(srv.admin_token) as admin, srv.client(self.other) as other:
                for domain, project in LINKS:
                    assert (
                        admin.post(f"{API}/link-domain", json={"domain": domain, "project_id": project}).status_code
                        == 201
                    )
                assert other.post(f"{API}/enable-email", json={"domain": "other.example"}).status_code == 200
                assert (
                    other.post(
                        f"{API}/add-user", json={"email": "info@other.example", "password": PASSWORD}
                    ).status_code
                    == 201
                )
        else:
            for domain, project in LINKS:
                srv.cli("call", "--data", data, "link-domain", f"domain={domain}", f"project_id={project}")
            srv.cli("call", "--data", data, "--project", "404", "enable-email", "domain=other.example")
            srv.cli(
                "call",
                "--data",
                data,
                "--project",
                "404",
                "add-user",
                "email=info@other.example",
                f"password={PASSWORD}",
            )


@pytest.fixture(scope="module")
def live_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with live_server(tmp_path_factory.mktemp("mcp")) as srv:
        yield Env(srv, live=True)


@pytest.fixture(scope="module")
def stdio_env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return Env(LiveServer(tmp_path_factory.mktemp("mcp-stdio")), live=False)


@pytest.fixture(params=["http", "stdio"])
def env(request: pytest.FixtureRequest) -> Env:
    return request.getfixturevalue("live_env" if request.param == "http" else "stdio_env")


def open_session(env: Env, token: str) -> Any:
    return http_session(env.srv, token) if env.srv.proc is not None else stdio_session(env.srv, token)


Call = Callable[[str, dict[str, Any]], Awaitable[Any]]


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return anyio.run(fn)


# --- the tool list ---------------------------------------------------------------------------


def test_tool_registry_is_the_spec_table() -> None:
    assert {op.name: op.tool_name for op in OPERATIONS.values() if op.in_spec} == SPEC_TOOLS
    assert set(TOOLS) == set(SPEC_TOOLS.values())
    for tool in tool_list():
        op = TOOLS[tool.name]
        assert tool.input_schema == op.request.model_json_schema()
        assert tool.input_schema["type"] == "object"
        assert tool.output_schema == RESPONSES[op.name].model_json_schema()
        assert tool.output_schema["type"] == "object"


def test_annotations_say_what_a_tool_destroys() -> None:
    hints = {t.name: t.annotations for t in tool_list()}
    assert hints["email_account_update_password"].destructive_hint is True  # it overwrites a credential
    for name in ("email_account_remove_user", "email_account_remove_domain", "email_account_disable_email"):
        assert hints[name].destructive_hint is True
    for name in (
        "email_account_add_user",
        "email_account_enable_email",
        "email_account_add_domain",
        "email_account_add_node",
    ):
        assert hints[name].destructive_hint is False
    for name in (
        "email_account_list_users",
        "email_account_list_domains",
        "email_account_list_nodes",
        "email_account_list_aliases",
    ):
        assert hints[name].read_only_hint is True
    for name in (
        "email_account_update_alias",
        "email_account_remove_alias",
        "email_account_set_forwarding",
        "email_account_remove_alias_domain",
    ):
        assert hints[name].destructive_hint is True
    for name in ("email_account_add_alias", "email_account_add_alias_domain"):
        assert hints[name].destructive_hint is False


def test_descriptions_carry_the_data_dirs_real_default_quota(tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = LiveServer(tmp_path_factory.mktemp("mcp-quota"))
    srv.cli("init", "--data", str(srv.data.root), "--bcrypt-cost", "4", "--default-quota-mb", "321")
    token = srv.create_token(name="quota-admin")

    async def main() -> dict[str, Any]:
        async with stdio_session(srv, token) as s:
            return {t.name: t for t in (await s.list_tools()).tools}

    tools = run(main)
    add_user = tools["email_account_add_user"].description or ""
    assert "default 321 MB" in add_user and "1-1048576 MB" in add_user and "8-72 bytes" in add_user
    assert "without project scoping" not in (tools["email_account_add_domain"].description or "")


def test_list_tools_is_exactly_the_spec(env: Env) -> None:
    async def main() -> list[Any]:
        async with open_session(env, env.project) as session:
            return (await session.list_tools()).tools

    tools = run(main)
    assert sorted(t.name for t in tools) == sorted(SPEC_TOOLS.values())
    add_user = next(t for t in tools if t.name == "email_account_add_user")
    assert add_user.input_schema["required"] == ["email", "password"]
    assert set(add_user.input_schema["properties"]) == {"email", "password", "quota_mb"}
    assert add_user.input_schema.get("additionalProperties") is False


# --- calling every tool ------------------------------------------------------------------------


def call_every_tool(
    domain: str, node: str, project_session: Any, admin_session: Any
) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with project_session as p, admin_session as a:

            async def call(session: ClientSession, tool: str, args: dict[str, Any]) -> dict[str, Any]:
                result = await session.call_tool(tool, args)
                assert result.is_error is False, result
                out[tool] = body_of(result)
                return out[tool]

            await call(p, "email_account_enable_email", {"domain": domain})
            await call(p, "email_account_add_user", {"email": f"info@{domain}", "password": PASSWORD})
            await call(p, "email_account_list_users", {"domain": domain})
            await call(p, "email_account_update_password", {"email": f"info@{domain}", "password": "a new password"})
            await call(p, "email_account_remove_user", {"email": f"info@{domain}"})
            await call(p, "email_account_restore_user", {"email": f"info@{domain}"})
            await call(a, "email_account_set_limits", {"project_id": 303, "max_mailboxes": 5, "send_per_hour": 40})
            await call(p, "email_account_list_limits", {})
            await call(p, "email_account_set_quota", {"email": f"info@{domain}", "quota_mb": 100})
            await call(p, "email_account_set_spam_policy", {"domain": domain, "action": "reject", "reject_score": 10})
            await call(p, "email_account_list_spam_policy", {"domain": domain})
            rule = {"email": f"info@{domain}", "sender": "@spam.test", "action": "block"}
            await call(p, "email_account_add_sender_rule", rule)
            await call(p, "email_account_list_sender_rules", {"domain": domain})
            await call(p, "email_account_remove_sender_rule", {"email": f"info@{domain}", "sender": "@spam.test"})
            await call(p, "email_account_suspend_sending", {"email": f"info@{domain}", "reason": "mcp test"})
            await call(p, "email_account_resume_sending", {"email": f"info@{domain}"})
            hook = await call(
                p, "email_account_add_webhook", {"url": "https://93.184.215.14/mcp", "events": ["dns.check_failed"]}
            )
            await call(p, "email_account_list_webhooks", {})
            await call(p, "email_account_remove_webhook", {"id": hook["id"]})
            await call(p, "email_account_add_alias", {"address": f"sales@{domain}", "destinations": [f"info@{domain}"]})
            await call(
                p, "email_account_update_alias", {"address": f"sales@{domain}", "destinations": ["x@ext.example"]}
            )
            await call(p, "email_account_list_aliases", {"domain": domain})
            # This server's mailstate.yaml has no dns: block: the tool answers the 409 in words.
            dns = await p.call_tool("email_account_dns_records", {"domain": domain})
            assert dns.is_error is True and "dns_not_configured" in str(dns.content), dns
            out["email_account_dns_records"] = dns
            for tool, args in (
                ("email_account_check_dns", {"domain": domain}),
                ("email_account_mobileconfig", {"email": f"info@{domain}"}),
            ):
                result = await p.call_tool(tool, args)
                assert result.is_error is True and "dns_not_configured" in str(result.content), result
                out[tool] = result
            await call(
                p,
                "email_account_set_forwarding",
                {"email": f"info@{domain}", "destinations": ["y@ext.example"], "keep_copy": False},
            )
            await call(p, "email_account_remove_alias", {"address": f"sales@{domain}"})
            box = f"info@{domain}"
            await call(p, "email_account_set_vacation", {"email": box, "enabled": True, "body": "Away."})
            rules = [{"name": "n", "field": "subject", "op": "is", "value": "x", "action": "discard"}]
            await call(p, "email_account_set_filters", {"email": box, "filters": rules})
            await call(p, "email_account_list_filters", {"email": box})
            await call(p, "email_account_add_app_password", {"email": box, "name": "phone", "scopes": ["imap"]})
            await call(p, "email_account_list_app_passwords", {"email": box})
            await call(p, "email_account_remove_app_password", {"email": box, "name": "phone"})
            await call(p, "email_account_remove_user", {"email": f"info@{domain}"})  # again, for disable-email
            await call(p, "email_account_list_domains", {})
            await call(p, "email_account_disable_email", {"domain": domain})
            await call(a, "email_account_add_domain", {"domain": f"admin-{domain}"})
            await call(a, "email_account_add_domain", {"domain": f"old-admin-{domain}"})
            await call(
                a, "email_account_add_alias_domain", {"domain": f"old-admin-{domain}", "target": f"admin-{domain}"}
            )
            await call(a, "email_account_remove_alias_domain", {"domain": f"old-admin-{domain}"})
            await call(a, "email_account_remove_domain", {"domain": f"old-admin-{domain}"})
            await call(a, "email_account_remove_domain", {"domain": f"admin-{domain}"})
            await call(a, "email_account_add_node", {"name": node})
            await call(a, "email_account_list_nodes", {})
            # A fleet: a domain placed before any node had an address gets its home at once.
            await call(a, "email_account_add_domain", {"domain": f"fleet-{domain}"})
            await call(a, "email_account_set_node_address", {"name": node, "address": f"mx.{domain}"})
            await call(a, "email_account_move_domain", {"domain": f"fleet-{domain}", "node": node})
            # A replica on a second addressed node; it never reported, so failing over moves nothing.
            await call(a, "email_account_add_node", {"name": f"{node}-2", "address": f"mx2.{domain}"})
            await call(a, "email_account_set_replica", {"domain": f"fleet-{domain}", "node": f"{node}-2"})
            await call(a, "email_account_failover_node", {"name": node})
        return out

    return main


def test_call_each_tool_once(env: Env) -> None:
    srv = env.srv
    domain, node = "mcp.example", "mpi-mcp"
    before = srv.commit_count()
    out = run(call_every_tool(domain, node, open_session(env, env.project), open_session(env, srv.admin_token)))
    assert set(out) == set(SPEC_TOOLS.values())
    assert out["email_account_add_user"]["email"] == f"info@{domain}"
    assert out["email_account_list_users"]["users"][0]["email"] == f"info@{domain}"
    assert out["email_account_remove_user"]["active"] is False
    assert out["email_account_restore_user"]["restored"] is True
    assert [d["domain"] for d in out["email_account_list_domains"]["domains"]] == [domain]
    assert out["email_account_add_node"]["sync_key"].startswith("mss_")
    assert node in [n["name"] for n in out["email_account_list_nodes"]["nodes"]]
    writes = [t for t, op in TOOLS.items() if op.write and t != "email_account_failover_node"]
    assert all(len(out[t]["commit"]) == 40 for t in writes)
    # remove-user and remove-domain ran twice, add-domain three times, add-node twice
    assert srv.commit_count() == before + len(writes) + 5
    failover = out["email_account_failover_node"]
    assert (failover["commit"], failover["moved"], failover["unavailable"]) == (None, [], [f"fleet-{domain}"])
    assert out["email_account_set_replica"]["replica"] == f"{node}-2"
    assert out["email_account_move_domain"]["to"] == node and out["email_account_move_domain"]["from"] is None
    assert out["email_account_list_aliases"]["aliases"][0]["destinations"] == ["x@ext.example"]
    assert out["email_account_set_forwarding"]["keep_copy"] is False
    assert out["email_account_add_alias_domain"]["alias_of"] == f"admin-{domain}"
    limits = out["email_account_list_limits"]["limits"][0]
    assert limits["project_id"] == 303 and limits["max_mailboxes"] == {"limit": 5, "use": 1}
    assert limits["send_per_hour"]["effective"] == 40
    assert out["email_account_suspend_sending"]["sending"] == "suspended"
    assert out["email_account_list_spam_policy"]["policies"][0]["effective"]["reject_score"] == 10
    assert out["email_account_add_webhook"]["secret"].startswith("whsec_")
    assert out["email_account_list_webhooks"]["webhooks"][0]["id"] == out["email_account_add_webhook"]["id"]
    assert "secret" not in out["email_account_list_webhooks"]["webhooks"][0]
    assert out["email_account_add_webhook"]["secret"] not in srv.git("log", "-p", "--all")
    # The same audit trail as HTTP: the Actor trailer names the token.
    log = srv.git("log", f"-{len(writes)}", "--format=%(trailers:key=Actor,valueonly)")
    assert set(log.split()) == {"token:mcp-project", "token:admin"}
    assert env.project not in srv.git("log", "-p", "--all")


# --- errors: the same code and message as HTTP --------------------------------------------------

ERROR_CASES = [
    ("project", "email_account_add_user", {"email": "x@other.example", "password": PASSWORD}),  # 404 another project's
    ("project", "email_account_remove_user", {"email": "info@other.example"}),  # 404
    ("project", "email_account_add_domain", {"domain": "nope.example"}),  # 403 admin only
    ("project", "email_account_list_nodes", {}),  # 403
    ("project", "email_account_add_user", {"email": "x@mcp.example", "password": "p" * 73}),  # 400 > 72 bytes
    ("project", "email_account_add_user", {"email": "x:y@mcp.example", "password": PASSWORD}),  # 400
    (
        "project",
        "email_account_add_user",
        {"email": "x@mcp.example", "password": PASSWORD, "admin": True},
    ),  # 400 unknown field
    ("project", "email_account_add_user", {"email": "x@mcp.example"}),  # 400 missing field
    ("other", "email_account_add_user", {"email": "info@other.example", "password": PASSWORD}),  # 409 exists
    ("other", "email_account_disable_email", {"domain": "other.example"}),  # 409 active remain
    (
        "project",
        "email_account_add_alias",
        {"address": "a@other.example", "destinations": ["x@y.org"]},
    ),  # 404 another project's
    ("project", "email_account_remove_alias", {"address": "nope@mcp.example"}),  # 404 alias_not_found
    ("project", "email_account_add_alias", {"address": "a@mcp.example", "destinations": []}),  # 400
    (
        "project",
        "email_account_add_alias",
        {"address": "a@mcp.example", "destinations": [f"u{i}@y.org" for i in range(51)]},
    ),  # 400
    (
        "project",
        "email_account_add_alias",
        {"address": "a@mcp.example", "destinations": ["a@mcp.example"]},
    ),  # 409 alias_loop
    (
        "project",
        "email_account_add_alias_domain",
        {"domain": "mcp.example", "target": "other.example"},
    ),  # 409 target invalid
]


def test_errors_match_http(env: Env, live_env: Env) -> None:
    """The same failing call over MCP (either transport) and over HTTP (the live server, which
    holds the same world) gives the same code and message."""
    srv = env.srv
    http_tokens = {"project": live_env.project, "other": live_env.other}
    before = srv.commit_count()

    async def main() -> list[tuple[dict[str, Any], dict[str, Any]]]:
        pairs = []
        async with open_session(env, env.project) as project, open_session(env, env.other) as other:
            sessions = {"project": project, "other": other}
            for who, tool, args in ERROR_CASES:
                result = await sessions[who].call_tool(tool, args)
                assert result.is_error is True, (tool, args, result)
                op = TOOLS[tool]
                with live_env.srv.client(http_tokens[who]) as c:
                    resp = (
                        c.get(f"{API}/{op.name}", params=args)
                        if op.method == "GET"
                        else c.post(f"{API}/{op.name}", json=args)
                    )
                assert_error(resp, (400, 403, 404, 409))
                pairs.append((body_of(result), resp.json()))
        return pairs

    for mcp_body, http_body in run(main):
        assert mcp_body == http_body
        assert PASSWORD not in json.dumps(mcp_body)
    assert srv.commit_count() == before


def test_unknown_tool_is_a_json_rpc_invalid_params_error(env: Env) -> None:
    async def main() -> MCPError:
        async with open_session(env, env.project) as s:
            with pytest.raises(MCPError) as info:
                await s.call_tool("email_account_drop_everything", {})
            # the session still works after the error
            assert (await s.call_tool("email_account_list_domains", {})).is_error is False
            return info.value

    error = run(main)
    assert error.code == INVALID_PARAMS == -32602
    assert "email_account_drop_everything" in error.error.message


def test_list_domains_shows_what_may_be_enabled(live_env: Env) -> None:
    srv = live_env.srv
    with srv.client(srv.admin_token) as admin:
        assert (
            admin.post(f"{API}/link-domain", json={"domain": "pending.example", "project_id": 303}).status_code == 201
        )

    async def main() -> dict[str, Any]:
        async with http_session(srv, live_env.project) as s:
            return body_of(await s.call_tool("email_account_list_domains", {}))

    listed = run(main)
    assert {"domain": "pending.example", "project_id": 303} in listed["linked_not_enabled"]
    assert "pending.example" not in [d["domain"] for d in listed["domains"]]
    with srv.client(live_env.project) as c:  # one operation: HTTP says the same
        assert c.get(f"{API}/list-domains").json() == listed


def test_modern_protocol_client_over_http(live_env: Env) -> None:
    """The SDK's high-level Client in auto mode (2026-07-28 per-request envelopes when offered)."""
    srv = live_env.srv

    async def main() -> tuple[list[str], dict[str, Any], dict[str, Any]]:
        async with (
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {live_env.other}"}) as http,
            Client(streamable_http_client(f"{srv.url}/mcp", http_client=http), mode="auto") as client,
        ):
            tools = [t.name for t in (await client.list_tools()).tools]
            ok = body_of(await client.call_tool("email_account_list_users", {"domain": "other.example"}))
            err = body_of(await client.call_tool("email_account_list_users", {"domain": "mcp.example"}))
            return tools, ok, err

    tools, ok, err = run(main)
    assert sorted(tools) == sorted(SPEC_TOOLS.values())
    assert [u["email"] for u in ok["users"]] == ["info@other.example"]
    assert err["error"]["code"] == "domain_not_found"


# --- /mcp auth ---------------------------------------------------------------------------------

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.mark.parametrize("auth", [None, "Bearer nope", "Bearer mst_000000000000_" + "A" * 43, "Basic eDp5"])
def test_mcp_http_needs_a_valid_bearer_token(live_env: Env, auth: str | None) -> None:
    headers = {**MCP_HEADERS, **({"Authorization": auth} if auth else {})}
    r = httpx.post(f"{live_env.srv.url}/mcp", json=INIT, headers=headers)
    assert_error(r, 401, "unauthenticated")
    assert r.headers["www-authenticate"].lower().startswith("bearer")


def test_mcp_refuses_foreign_origins_and_hosts(live_env: Env) -> None:
    """DNS-rebinding protection: a browser page on another origin (or a rebound name) is refused
    with 403 before its token is even looked at; clients without Origin and the server's own
    origin pass."""
    srv = live_env.srv
    url = f"{srv.url}/mcp"
    auth = {**MCP_HEADERS, "Authorization": f"Bearer {live_env.project}"}
    for origin in (
        "http://evil.example",
        f"http://evil.example:{srv.port}",
        "null",
        f"http://127.0.0.1:{srv.port + 1}",
    ):
        assert_error(httpx.post(url, json=INIT, headers={**auth, "Origin": origin}), 403, "origin_not_allowed")
    assert_error(
        httpx.post(url, json=INIT, headers={**MCP_HEADERS, "Origin": "http://evil.example"}), 403, "origin_not_allowed"
    )
    assert_error(
        httpx.post(url, json=INIT, headers={**auth, "Host": f"evil.example:{srv.port}"}), 403, "host_not_allowed"
    )
    for origin in (f"http://127.0.0.1:{srv.port}", f"http://localhost:{srv.port}"):
        assert httpx.post(url, json=INIT, headers={**auth, "Origin": origin}).status_code == 200
    assert httpx.post(url, json=INIT, headers={**auth, "Host": f"localhost:{srv.port}"}).status_code == 200
    assert httpx.post(url, json=INIT, headers=auth).status_code == 200  # no Origin: not a browser


def test_security_settings_for_each_kind_of_bind() -> None:
    loop = security_settings("127.0.0.1", 8025)
    assert "127.0.0.1:8025" in loop.allowed_hosts and "localhost:8025" in loop.allowed_hosts
    assert "http://localhost:8025" in loop.allowed_origins
    named = security_settings("10.1.2.3", 8025, ["mail-api.example.com"])
    assert named.allowed_hosts == ["10.1.2.3:8025", "mail-api.example.com"]
    assert "https://mail-api.example.com" in named.allowed_origins
    # every interface, no names given: Host cannot be checked, Origin still is
    anywhere = security_settings("0.0.0.0", 8025)
    assert anywhere.allowed_hosts == [] and anywhere.allowed_origins == []


def test_mcp_session_is_bound_to_its_token(live_env: Env) -> None:
    url = f"{live_env.srv.url}/mcp"
    r = httpx.post(url, json=INIT, headers={**MCP_HEADERS, "Authorization": f"Bearer {live_env.project}"})
    assert r.status_code == 200
    sid = r.headers["mcp-session-id"]
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
    hijack = httpx.post(
        url, json=listing, headers={**MCP_HEADERS, "Authorization": f"Bearer {live_env.other}", "Mcp-Session-Id": sid}
    )
    assert hijack.status_code == 404


def test_revoked_token_stops_working_mid_session(live_env: Env) -> None:
    srv = live_env.srv
    token = srv.create_token(project=303, name="mcp-revoked")

    async def main() -> tuple[bool, bool]:
        async with http_session(srv, token) as s:
            first = await s.call_tool("email_account_list_domains", {})
            srv.cli("token", "revoke", "--data", str(srv.data.root), "mcp-revoked")
            try:
                with anyio.fail_after(20):
                    second = await s.call_tool("email_account_list_domains", {})
                refused = bool(second.is_error)
            except Exception:
                refused = True
            return first.is_error is False, refused

    ok, refused = run(main)
    assert ok and refused


def test_stdio_refuses_a_bad_token(live_env: Env) -> None:
    proc = live_env.srv.cli(
        "mcp", "--data", str(live_env.srv.data.root), "--token", "mst_000000000000_" + "A" * 43, check=False
    )
    assert proc.returncode == 3 and "unauthenticated" in proc.stderr
    proc = live_env.srv.cli(
        "mcp", "--data", str(live_env.srv.root / "nowhere"), "--token", live_env.project, check=False
    )
    assert proc.returncode != 0 and "not a mailstate data dir" in proc.stderr
    assert not (live_env.srv.root / "nowhere").exists()


def test_stdio_picks_up_commits_made_by_another_process(tmp_path_factory: pytest.TempPathFactory) -> None:
    """`mailstate mcp` is not the data dir's only writer (the CLI, or a server, may write too):
    when the branch moved after the stdio process loaded it, the next call reloads the state
    instead of failing, and nobody's commit is lost."""
    srv = LiveServer(tmp_path_factory.mktemp("mcp-beside"))
    data = str(srv.data.root)
    srv.cli("init", "--data", data, "--bcrypt-cost", "4")
    token = srv.create_token(name="stdio-admin")

    async def main() -> list[dict[str, Any]]:
        out = []
        async with stdio_session(srv, token) as s:
            out.append(body_of(await s.call_tool("email_account_add_domain", {"domain": "one.example"})))
            srv.cli("call", "--data", data, "add-node", "name=beside")  # another process moves the branch
            out.append(body_of(await s.call_tool("email_account_add_domain", {"domain": "two.example"})))
            out.append(body_of(await s.call_tool("email_account_list_nodes", {})))
        return out

    one, two, listed = run(main)
    assert len(one["commit"]) == 40 and len(two["commit"]) == 40
    assert [n["name"] for n in listed["nodes"]] == ["beside"]
    assert srv.git("log", "--format=%s", "main").split("\n")[:3] == [
        "add-domain two.example",
        "add-node beside",
        "add-domain one.example",
    ]
    for rev in srv.git("rev-list", "main").split():
        assert srv.verify_commit(rev).returncode == 0
