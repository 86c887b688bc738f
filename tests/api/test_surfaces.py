"""The surfaces as a whole: every operation has its HTTP route and (if in the spec) its MCP
tool, every CLI command has a working --help, project isolation holds through EVERY endpoint
and tool, admin endpoints are admin-only, and no input makes the server answer 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.routing import Route

import mailstate.api.cli as cli
from mailstate.api.mcp_server import TOOLS, tool_list
from mailstate.api.server import create_app
from mailstate.state.datadir import DataDir
from mailstate.state.ops import OPERATIONS
from tests.helpers.mcp import http_session
from tests.helpers.server import LiveServer, assert_error, live_server

API = "/v1/email-account"
PASSWORD = "correct horse battery"
SPEC_ADMIN = {"add-domain", "remove-domain", "list-nodes", "add-node"}  # the spec's [Admin] endpoints
FLEET_ADMIN = {"move-domain", "set-node-address", "set-replica", "failover-node"}  # one fleet; replicas, failover


# --- meta: the registry drives every surface -----------------------------------------------------


def test_every_operation_has_a_route_with_its_method(data_dir: DataDir) -> None:
    app = create_app(data_dir.root)
    paths = app.openapi()["paths"]
    for op in OPERATIONS.values():
        assert set(paths.get(f"{API}/{op.name}", {})) == {op.method.lower()}, op.name
    assert {p for p in paths if p.startswith(API + "/")} == {f"{API}/{name}" for name in OPERATIONS}
    assert any(isinstance(r, Route) and r.path == "/mcp" for r in app.routes)


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return _resolve(spec, spec["components"]["schemas"][ref.rsplit("/", 1)[1]]) if ref else schema


def test_every_route_documents_a_non_empty_success_schema(data_dir: DataDir) -> None:
    spec = create_app(data_dir.root).openapi()
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            success = {code: r for code, r in op["responses"].items() if code.startswith("2")}
            assert success, (method, path)
            for code, resp in success.items():
                content = resp.get("content", {})
                assert content, (method, path, code)
                for media in content.values():
                    schema = _resolve(spec, media["schema"])
                    assert schema and (schema.get("properties") or schema.get("type") == "string"), (
                        method,
                        path,
                        code,
                        schema,
                    )
            # every response, errors too, is documented with a schema; nothing answers 422
            assert "422" not in op["responses"], (method, path)
            for code, resp in op["responses"].items():
                assert resp.get("content"), (method, path, code)
    for name, op in OPERATIONS.items():
        doc = spec["paths"][f"{API}/{name}"][op.method.lower()]
        assert set(doc["responses"]) >= {"400", "405"} | (set() if op.public else {"401"}), name
        assert ("401" in doc["responses"]) != op.public, name  # a public operation takes no token
        assert ("413" in doc["responses"]) == (op.method == "POST"), name
        assert ("403" in doc["responses"]) == op.admin, name
        assert _resolve(
            spec,
            next(iter(doc["responses"][min(c for c in doc["responses"] if c.startswith("2"))]["content"].values()))[
                "schema"
            ],
        )["title"]
        if op.write:
            success = next(r for c, r in doc["responses"].items() if c.startswith("2"))
            assert "commit" in _resolve(spec, success["content"]["application/json"]["schema"])["properties"], name


def test_schemas_carry_the_input_constraints(data_dir: DataDir) -> None:
    schemas = create_app(data_dir.root).openapi()["components"]["schemas"]
    add_user = schemas["AddUserRequest"]["properties"]
    assert (
        add_user["password"]["x-min-bytes"],
        add_user["password"]["x-max-bytes"],
        add_user["password"]["maxLength"],
    ) == (8, 72, 72)
    quota = next(s for s in add_user["quota_mb"]["anyOf"] if s.get("type") == "integer")
    assert (quota["minimum"], quota["maximum"]) == (1, 1048576)
    assert schemas["AddNodeRequest"]["properties"]["name"]["pattern"] == "^[a-z0-9](?:[a-z0-9-]{0,57}[a-z0-9])?$"
    for model, field in (("EnableEmailRequest", "domain"), ("AddUserRequest", "email"), ("NodeRequest", "name")):
        assert schemas[model]["properties"][field]["minLength"] >= 1, (model, field)
    assert schemas["LinkDomainRequest"]["properties"]["project_id"]["minimum"] == 1


# What a tool's description must name, by the input fields it takes.
LIMITS = {
    "password": ["8-72 bytes"],
    "quota_mb": ["1-1048576 MB", "default 1024 MB"],
    "name": ["1-59"],
    "hard_delete": ["Soft delete", "Hard delete"],
    "destinations": ["50 email addresses", "alias_loop", "too_many_destinations"],
    "address": ["@domain"],
    "keep_copy": ["keep_copy=false"],
    "target": ["alias_domain_target_invalid"],
    "limit": ["1-1000", "next_cursor"],
    "cursor": ["`next_cursor` is null", "appear twice or go missing"],
    "filters": ["0-50", "too_many_filters", "invalid_folder", "no '..'", "500 characters", "alias_loop"],
    "subject": ["200 characters"],
    "body": ["16 KiB", "16384 bytes"],
    "interval_days": ["1-365", "default 7"],
    "start": ["ISO dates"],
    "end": ["ISO dates", "vacation_ends_before_start"],
    "scopes": ["imap", "smtp", "cannot send"],
}
# Where a field name means something else in one tool (an app password's name is not a node's).
TOOL_LIMITS = {
    ("email_account_add_app_password", "name"): ["1-64", "app_password_name_taken", "shown ONCE", "At most 20"],
    ("email_account_remove_app_password", "name"): ["app_password_not_found"],
    # A field name that means something else on some tools: a node's address, not an alias.
    ("email_account_add_node", "address"): ["host name", "IPv4/IPv6"],
    ("email_account_set_node_address", "address"): ["host name", "IPv4/IPv6"],
}


def test_every_tool_has_an_output_schema_and_names_its_limits() -> None:
    for tool in tool_list():
        op = TOOLS[tool.name]
        assert tool.output_schema and tool.output_schema.get("properties"), tool.name
        if op.write:
            assert "commit" in tool.output_schema["properties"], tool.name
        text = tool.description or ""
        assert len(text) > len(op.summary) + 40, tool.name  # more than the one-line summary
        for field in tool.input_schema.get("properties", {}):
            for needle in TOOL_LIMITS.get((tool.name, field), LIMITS.get(field, [])):
                assert needle in text, (tool.name, field, needle)
    text = {t.name: t.description or "" for t in tool_list()}
    assert "PURGED" in text["email_account_disable_email"] and "PURGED" in text["email_account_remove_domain"]
    assert (
        "project_id" in text["email_account_add_domain"]
        and "without project scoping" not in text["email_account_add_domain"]
    )
    assert "linked_not_enabled" in text["email_account_list_domains"]


@pytest.mark.e2e
def test_every_operation_answers_on_its_route_and_method_only(world: World) -> None:
    for op in OPERATIONS.values():
        right = world.c.request(op.method, f"{API}/{op.name}")
        assert right.status_code not in (404, 405) or right.json()["error"]["code"] not in (
            "not_found",
            "method_not_allowed",
        ), op.name
        wrong = world.c.request("POST" if op.method == "GET" else "GET", f"{API}/{op.name}")
        assert_error(wrong, 405, "method_not_allowed")


def test_every_spec_operation_has_a_tool_and_nothing_else_does() -> None:
    spec_ops = {op.name for op in OPERATIONS.values() if op.in_spec}
    # the spec's 11, restore-user, the 7 alias operations, dns-records, check-dns, mobileconfig,
    # the owners' 6, the 8 platform controls, the fleet's move-domain and set-node-address,
    # set-replica and failover-node, and the 5 spam policy and sender rule operations (every
    # extension is a tool)
    assert len(spec_ops) == 12 + 7 + 1 + 2 + 6 + 8 + 2 + 2 + 5
    assert {op.name for op in TOOLS.values()} == spec_ops
    assert [t.name for t in tool_list()] == [OPERATIONS[n].tool_name for n in OPERATIONS if OPERATIONS[n].in_spec]
    assert {n for n, op in OPERATIONS.items() if op.admin and op.in_spec} == SPEC_ADMIN | FLEET_ADMIN | {"set-limits"}


def _commands(parser: Any, prefix: list[str]) -> Iterator[list[str]]:
    yield prefix
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield from _commands(sub, [*prefix, name])


def test_every_cli_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    commands = list(_commands(cli.build_parser(), []))
    assert ["serve"] in commands and ["mcp"] in commands and ["token", "create"] in commands
    for argv in commands:
        with pytest.raises(SystemExit) as exc:
            cli.main([*argv, "--help"])
        assert exc.value.code == 0, argv
        assert "usage:" in capsys.readouterr().out


# --- a world with two projects ----------------------------------------------------------------


class World:
    def __init__(self, srv: LiveServer) -> None:
        self.srv = srv
        self.tok_a = srv.create_token(project=101, name="iso-a")
        self.tok_b = srv.create_token(project=202, name="iso-b")
        self.tok_c = srv.create_token(project=303, name="iso-c")  # owns nothing
        self.admin = srv.client(srv.admin_token)
        self.a = srv.client(self.tok_a)
        self.b = srv.client(self.tok_b)
        self.c = srv.client(self.tok_c)
        for client, domain, project in ((self.a, "a.example", 101), (self.b, "b.example", 202)):
            assert (
                self.admin.post(f"{API}/link-domain", json={"domain": domain, "project_id": project}).status_code == 201
            )
            assert client.post(f"{API}/enable-email", json={"domain": domain}).status_code == 200
            assert (
                client.post(f"{API}/add-user", json={"email": f"info@{domain}", "password": PASSWORD}).status_code
                == 201
            )
        # b also has a linked domain without email, and a soft-deleted mailbox.
        assert (
            self.admin.post(f"{API}/link-domain", json={"domain": "b-dark.example", "project_id": 202}).status_code
            == 201
        )
        assert self.b.post(f"{API}/add-user", json={"email": "old@b.example", "password": PASSWORD}).status_code == 201
        assert self.b.post(f"{API}/remove-user", json={"email": "old@b.example"}).status_code == 200
        # b has an alias and a catch-all for a's attacks to aim at.
        for address in ("sales@b.example", "@b.example"):
            assert (
                self.b.post(
                    f"{API}/add-alias", json={"address": address, "destinations": ["info@b.example"]}
                ).status_code
                == 201
            )
        assert self.admin.post(f"{API}/add-node", json={"name": "iso-node"}).status_code == 201
        # b has a webhook (to a public address literal; its event never fires here) for a's attacks.
        hook = self.b.post(
            f"{API}/add-webhook", json={"url": "https://93.184.215.14/h", "events": ["dns.check_failed"]}
        )
        assert hook.status_code == 201, hook.text
        self.b_hook = hook.json()["id"]

    def b_view(self) -> tuple[Any, ...]:
        return (
            self.b.get(f"{API}/list-domains").json(),
            self.b.get(f"{API}/list-users").json(),
            self.b.get(f"{API}/list-aliases").json(),
            self.admin.get(f"{API}/list-users", params={"domain": "b-dark.example"}).json(),
            self.b.get(f"{API}/list-limits").json(),
            self.b.get(f"{API}/list-webhooks").json(),
            self.srv.git("rev-parse", "main").strip(),
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with live_server(tmp_path_factory.mktemp("surfaces")) as srv:
        w = World(srv)
        yield w
        for c in (w.admin, w.a, w.b, w.c):
            c.close()


# What project A sends to each endpoint to reach project B. Every operation must be listed.
ATTACKS: dict[str, list[dict[str, Any]]] = {
    "enable-email": [{"domain": "b.example"}, {"domain": "b-dark.example"}],
    "disable-email": [{"domain": "b.example"}, {"domain": "b-dark.example"}],
    "list-domains": [{}],
    "add-user": [
        {"email": "evil@b.example", "password": PASSWORD},
        {"email": "evil@b-dark.example", "password": PASSWORD},
    ],
    "remove-user": [
        {"email": "info@b.example"},
        {"email": "info@b.example", "hard_delete": True},
        {"email": "old@b.example", "hard_delete": True},
    ],
    "restore-user": [{"email": "old@b.example"}, {"email": "info@b.example"}],
    "list-users": [{}, {"domain": "b.example"}, {"domain": "b-dark.example"}],
    "update-password": [
        {"email": "info@b.example", "password": "attacker pass"},
        {"email": "old@b.example", "password": "attacker pass"},
    ],
    "add-domain": [{"domain": "b.example"}, {"domain": "new.example", "project_id": 202}],
    "remove-domain": [{"domain": "b.example"}, {"domain": "b-dark.example"}],
    "list-nodes": [{}],
    "add-node": [{"name": "evil"}],
    "link-domain": [{"domain": "b.example", "project_id": 101}, {"domain": "b-dark.example", "project_id": 101}],
    "unlink-domain": [{"domain": "b-dark.example"}],
    "remove-node": [{"name": "iso-node"}],
    "rotate-node-key": [{"name": "iso-node"}],
    "add-alias": [
        {"address": "evil@b.example", "destinations": ["x@a.example"]},
        {"address": "@b-dark.example", "destinations": ["x@a.example"]},
    ],
    "update-alias": [{"address": "sales@b.example", "destinations": ["x@a.example"]}],
    "remove-alias": [{"address": "sales@b.example"}, {"address": "@b.example"}],
    "list-aliases": [{}, {"domain": "b.example"}],
    "set-forwarding": [
        {"email": "info@b.example", "destinations": ["x@a.example"]},
        {"email": "old@b.example", "destinations": []},
    ],
    "add-alias-domain": [
        {"domain": "b.example", "target": "a.example"},
        {"domain": "b-dark.example", "target": "b.example"},
    ],
    "remove-alias-domain": [{"domain": "b.example"}],
    "dns-records": [{"domain": "b.example"}, {"domain": "b-dark.example"}],
    "move-domain": [{"domain": "b.example", "node": "iso-node"}],
    "set-node-address": [{"name": "iso-node", "address": "evil.example"}],
    "set-replica": [{"domain": "b.example", "node": "iso-node"}],
    "failover-node": [{"name": "iso-node"}],
    "check-dns": [{"domain": "b.example"}, {"domain": "b-dark.example"}],
    # Public by design for every email-enabled domain (tests/api/test_autoconfig.py): the attack is
    # on b's domain without email, which must read as absent.
    "mobileconfig": [{"email": "info@b-dark.example"}],
    "set-vacation": [{"email": "info@b.example", "enabled": True, "body": "hijacked"}],
    "set-filters": [
        {
            "email": "info@b.example",
            "filters": [
                {"name": "x", "field": "to", "op": "is", "value": "v", "action": "redirect", "target": "x@a.example"}
            ],
        },
        {"email": "old@b.example", "filters": []},
    ],
    "list-filters": [{"email": "info@b.example"}],
    "add-app-password": [{"email": "info@b.example", "name": "attacker", "scopes": ["imap", "smtp"]}],
    "list-app-passwords": [{"email": "info@b.example"}],
    "remove-app-password": [{"email": "info@b.example", "name": "phone"}],
    "set-limits": [{"project_id": 202, "max_mailboxes": 0}, {"domain": "b.example", "send_per_hour": 0}],
    "list-limits": [{}, {"project_id": 202}, {"domain": "b.example"}],
    "set-quota": [{"email": "info@b.example", "quota_mb": 1}, {"email": "old@b.example", "quota_mb": 1}],
    "set-spam-policy": [{"email": "info@b.example", "action": "off"}, {"domain": "b.example", "action": "off"}],
    "list-spam-policy": [{"domain": "b.example"}],
    "add-sender-rule": [{"email": "info@b.example", "sender": "@evil.test", "action": "allow"}],
    "list-sender-rules": [{"domain": "b.example"}, {"email": "info@b.example"}],
    "remove-sender-rule": [{"domain": "b.example", "sender": "@spam.test"}],
    "suspend-sending": [{"email": "info@b.example", "reason": "taken over"}],
    "resume-sending": [{"email": "info@b.example"}],
    # A project's webhook gets its own project's events only (tests/test_webhooks_e2e.py); the platform's
    # node events are for admins.
    "add-webhook": [{"url": "https://93.184.215.14/h", "events": ["node.stale"]}],
    "list-webhooks": [{}],
    "remove-webhook": [{"id": "B_HOOK"}],
}


def test_the_attack_table_covers_every_operation() -> None:
    assert set(ATTACKS) == set(OPERATIONS)


def _call(client: httpx.Client, name: str, body: dict[str, Any]) -> httpx.Response:
    op = OPERATIONS[name]
    if op.method == "GET":
        return client.get(f"{API}/{name}", params=body)
    return client.post(f"{API}/{name}", json=body)


B_NAMES = ("b.example", "b-dark", "info@b", "old@b")


def _expect_refused(name: str, body: dict[str, Any]) -> str | None:
    """The error code project A must get for this attack, or None when it is a plain read."""
    op = OPERATIONS[name]
    if op.admin or name == "add-webhook":
        return "admin_required"
    if op.write or op.local or "domain" in body or "email" in body or "project_id" in body or op.public:
        return "not_found"
    return None


def _bodies(world: World, name: str) -> list[dict[str, Any]]:
    return [{k: world.b_hook if v == "B_HOOK" else v for k, v in body.items()} for body in ATTACKS[name]]


NOT_FOUND_CODES = (
    "domain_not_found",
    "mailbox_not_found",
    "alias_not_found",
    "project_not_found",
    "webhook_not_found",
)


@pytest.mark.e2e
def test_project_isolation_over_every_http_endpoint(world: World) -> None:
    before = world.b_view()
    for name in ATTACKS:
        for body in _bodies(world, name):
            r = _call(world.a, name, body)
            expected = _expect_refused(name, body)
            if expected == "admin_required":
                assert_error(r, 403, "admin_required")
            elif expected == "not_found":
                # Says only that what was asked for is not there (see test_foreign_and_absent_look_the_same).
                assert assert_error(r, 404)["code"] in NOT_FOUND_CODES
            else:
                assert r.status_code == 200, (name, r.text)
                assert not any(n in r.text for n in B_NAMES), (name, r.text)
    assert world.b_view() == before


@pytest.mark.e2e
def test_foreign_and_absent_look_the_same(world: World) -> None:
    """A 404 for another project's domain says exactly what a 404 for a domain that does not exist says."""
    pairs = [
        ("enable-email", {"domain": "b.example"}, {"domain": "zz.example"}),
        ("add-user", {"email": "x@b.example", "password": PASSWORD}, {"email": "x@zz.example", "password": PASSWORD}),
        ("remove-user", {"email": "info@b.example"}, {"email": "info@zz.example"}),
        (
            "update-password",
            {"email": "info@b.example", "password": PASSWORD},
            {"email": "info@zz.example", "password": PASSWORD},
        ),
        ("restore-user", {"email": "old@b.example"}, {"email": "old@zz.example"}),
        ("list-users", {"domain": "b.example"}, {"domain": "zz.example"}),
    ]
    for name, foreign, absent in pairs:
        f, a = _call(world.a, name, foreign), _call(world.a, name, absent)
        assert f.status_code == a.status_code == 404
        norm = [json.dumps(r.json()).replace("b.example", "D").replace("zz.example", "D") for r in (f, a)]
        assert norm[0] == norm[1], (name, norm)


@pytest.mark.e2e
def test_project_isolation_over_every_mcp_tool(world: World) -> None:
    before = world.b_view()

    async def main() -> list[tuple[str, dict[str, Any], Any]]:
        out = []
        async with http_session(world.srv, world.tok_a) as s:
            for name in ATTACKS:
                op = OPERATIONS[name]
                if not op.in_spec:
                    continue
                for body in _bodies(world, name):
                    out.append((name, body, await s.call_tool(op.tool_name, body)))
        return out

    results = anyio.run(main)
    assert {n for n, _, _ in results} == {n for n, op in OPERATIONS.items() if op.in_spec}
    for name, body, result in results:
        text = result.content[0].text
        if _expect_refused(name, body) is None:
            assert result.is_error is False and not any(n in text for n in B_NAMES), (name, text)
        else:
            assert result.is_error is True, (name, text)
            code = json.loads(text)["error"]["code"]
            assert code in ("admin_required", "node_not_found", *NOT_FOUND_CODES), (name, code)
    assert world.b_view() == before


@pytest.mark.e2e
def test_admin_endpoints_are_admin_only(world: World) -> None:
    admin_ops = {n for n, op in OPERATIONS.items() if op.admin}
    assert admin_ops == SPEC_ADMIN | FLEET_ADMIN | {
        "link-domain",
        "unlink-domain",
        "remove-node",
        "rotate-node-key",
        "set-limits",
    }
    before = world.srv.git("rev-parse", "main").strip()
    for name in sorted(admin_ops):
        for client in (world.a, world.b, world.c):
            for body in ATTACKS[name] + [{}]:
                assert_error(_call(client, name, body), 403, "admin_required")
        assert _call(world.admin, name, ATTACKS[name][0]).status_code != 403
    assert world.admin.get(f"{API}/list-nodes").status_code == 200
    assert before != world.srv.git("rev-parse", "main").strip()  # the admin's calls did write


# --- no input makes a 5xx -------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    ["domain", "email", "password", "quota_mb", "hard_delete", "project_id", "name", "ip_address", "x"]
)
FIELD_VALUES = st.one_of(
    JSON,
    st.sampled_from(
        [
            "a.example",
            "info@a.example",
            "x@b.example",
            "../x",
            "a:b@c.de",
            "é@ü.example",
            "\x00",
            "x" * 300,
            PASSWORD,
            "mpi02",
            "::1",
        ]
    ),
)
BODIES = st.one_of(JSON, st.dictionaries(FIELDS, FIELD_VALUES, max_size=4))


@pytest.mark.e2e
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(name=st.sampled_from(sorted(OPERATIONS)), body=BODIES, who=st.sampled_from(["c", "a", "admin"]))
def test_no_input_makes_a_5xx(world: World, name: str, body: Any, who: str) -> None:
    client = {"a": world.a, "c": world.c, "admin": world.admin}[who]
    op = OPERATIONS[name]
    if op.method == "GET":
        params = (
            {str(k): json.dumps(v) if not isinstance(v, str) else v for k, v in body.items()}
            if isinstance(body, dict)
            else {"q": json.dumps(body)}
        )
        r = client.get(f"{API}/{name}", params=params)
    else:
        r = client.post(
            f"{API}/{name}", content=json.dumps(body).encode(), headers={"content-type": "application/json"}
        )
    assert r.status_code < 500, (name, body, r.text)
    if r.status_code >= 400:
        err = assert_error(r, r.status_code)
        if isinstance(body, dict) and isinstance(body.get("password"), str) and len(body["password"]) >= 8:
            assert body["password"] not in err["message"]


@pytest.mark.e2e
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="?#%"), max_size=40),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
)
@example(path="/::", method="GET")
@example(path="docs/static/../../etc/passwd", method="GET")
def test_no_path_makes_a_5xx(world: World, path: str, method: str) -> None:
    # An absolute URL: relative to the client's base, a path starting with "//" would be read
    # as a host and port (httpx.InvalidURL for "//::"), never reaching the server.
    r = world.a.request(method, httpx.URL(f"{world.srv.url}/{path}"))
    assert r.status_code < 500, (method, path, r.text)
    if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        assert "detail" not in r.json()


# --- serve on an initialised dir -------------------------------------------------------------------


@pytest.mark.e2e
def test_serve_again_prints_no_token_and_keeps_state(tmp_path: Path) -> None:
    srv = LiveServer(tmp_path)
    srv.start()
    try:
        first = srv.admin_token
        assert first
        with srv.client(first) as c:
            assert c.post(f"{API}/add-domain", json={"domain": "kept.example"}).status_code == 201
    finally:
        srv.stop()
    srv.start()
    try:
        assert "mst_" not in srv.stdout and "shown ONCE" not in srv.stdout
        assert "--bcrypt-cost only applies when initialising" in srv.log_text()
        with srv.client(first) as c:
            assert [d["domain"] for d in c.get(f"{API}/list-domains").json()["domains"]] == ["kept.example"]
    finally:
        srv.stop()


@pytest.mark.e2e
def test_serve_refuses_a_non_empty_directory_that_is_not_a_data_dir(tmp_path: Path) -> None:
    srv = LiveServer(tmp_path)
    srv.data.root.mkdir(parents=True)
    (srv.data.root / "notes.txt").write_text("mine")
    before = srv.data.root.stat().st_mode
    proc = srv.cli("serve", "--data", str(srv.data.root), "--port", "1", check=False)
    assert proc.returncode != 0 and "neither empty nor a mailstate data dir" in proc.stderr
    assert sorted(p.name for p in srv.data.root.iterdir()) == ["notes.txt"]
    assert srv.data.root.stat().st_mode == before
