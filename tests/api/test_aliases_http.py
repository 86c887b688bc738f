"""Every alias error code through the real HTTP server AND the MCP tools (streamable HTTP),
with the same code and message on both, and the repo untouched by each refusal."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from mailstate.state.ops import OPERATIONS
from tests.helpers.mcp import http_session
from tests.helpers.server import LiveServer, assert_error, live_server

pytestmark = pytest.mark.e2e

API = "/v1/email-account"
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str, str]]:
    with live_server(tmp_path_factory.mktemp("alias-http")) as s:
        a, b = s.create_token(project=11, name="alias-a"), s.create_token(project=22, name="alias-b")
        admin = s.client(s.admin_token)
        for domain, project in (("a.example", 11), ("a-old.example", 11), ("a-dark.example", 11), ("b.example", 22)):
            assert admin.post(f"{API}/link-domain", json={"domain": domain, "project_id": project}).status_code == 201
        with s.client(a) as ca, s.client(b) as cb:
            for c, domain in ((ca, "a.example"), (ca, "a-old.example"), (cb, "b.example")):
                assert c.post(f"{API}/enable-email", json={"domain": domain}).status_code == 200
            assert ca.post(f"{API}/add-user", json={"email": "info@a.example", "password": PASSWORD}).status_code == 201
            assert (
                ca.post(
                    f"{API}/add-alias", json={"address": "sales@a.example", "destinations": ["info@a.example"]}
                ).status_code
                == 201
            )
            for i in range(7, -1, -1):  # a chain of 8 steps: one more is too long
                nxt = "info@a.example" if i == 7 else f"h{i + 1}@a.example"
                assert (
                    ca.post(f"{API}/add-alias", json={"address": f"h{i}@a.example", "destinations": [nxt]}).status_code
                    == 201
                )
            assert (
                cb.post(
                    f"{API}/add-alias", json={"address": "x@b.example", "destinations": ["y@ext.example"]}
                ).status_code
                == 201
            )
        admin.close()
        yield s, a, b


CASES: list[tuple[str, dict[str, Any], int, str]] = [
    ("add-alias", {"address": "info@a.example", "destinations": ["x@ext.example"]}, 409, "address_in_use"),
    ("add-alias", {"address": "sales@a.example", "destinations": ["x@ext.example"]}, 409, "alias_exists"),
    ("add-alias", {"address": "loop@a.example", "destinations": ["loop@a.example"]}, 409, "alias_loop"),
    ("update-alias", {"address": "h7@a.example", "destinations": ["h0@a.example"]}, 409, "alias_loop"),
    ("add-alias", {"address": "top@a.example", "destinations": ["h0@a.example"]}, 409, "alias_chain_too_long"),
    (
        "add-alias",
        {"address": "many@a.example", "destinations": [f"u{i}@ext.example" for i in range(51)]},
        400,
        "too_many_destinations",
    ),
    ("add-alias", {"address": "e@a.example", "destinations": []}, 400, "invalid_destinations"),
    ("add-alias", {"address": "e\n@a.example", "destinations": ["x@ext.example"]}, 400, "invalid_email"),
    ("add-alias", {"address": "e@b.example", "destinations": ["x@ext.example"]}, 404, "domain_not_found"),
    ("update-alias", {"address": "x@b.example", "destinations": ["x@ext.example"]}, 404, "alias_not_found"),
    ("remove-alias", {"address": "nope@a.example"}, 404, "alias_not_found"),
    ("list-aliases", {"domain": "b.example"}, 404, "domain_not_found"),
    ("set-forwarding", {"email": "info@a.example", "destinations": ["info@a.example"]}, 409, "alias_loop"),
    ("set-forwarding", {"email": "nope@a.example", "destinations": ["x@ext.example"]}, 404, "mailbox_not_found"),
    (
        "set-forwarding",
        {"email": "info@a.example", "destinations": ["x@ext.example"], "keep_copy": "no"},
        400,
        "invalid_request",
    ),
    ("add-alias-domain", {"domain": "a-old.example", "target": "b.example"}, 409, "alias_domain_target_invalid"),
    ("add-alias-domain", {"domain": "a-old.example", "target": "a-dark.example"}, 409, "alias_domain_target_invalid"),
    ("add-alias-domain", {"domain": "a-old.example", "target": "a-old.example"}, 409, "alias_domain_target_invalid"),
    ("add-alias-domain", {"domain": "b.example", "target": "a.example"}, 404, "domain_not_found"),
    ("remove-alias-domain", {"domain": "a.example"}, 404, "alias_not_found"),
]


def test_every_alias_error_over_http_and_mcp(srv: tuple[LiveServer, str, str]) -> None:
    s, token, _ = srv
    head = s.git("rev-parse", "main").strip()
    http_bodies = []
    with s.client(token) as c:
        for op, body, status, code in CASES:
            r = (
                c.get(f"{API}/{op}", params=body)
                if OPERATIONS[op].method == "GET"
                else c.post(f"{API}/{op}", json=body)
            )
            assert assert_error(r, status, code)["code"] == code, (op, body, r.text)
            http_bodies.append(r.json())

    async def main() -> list[dict[str, Any]]:
        out = []
        async with http_session(s, token) as session:
            for op, body, _, _ in CASES:
                result = await session.call_tool(OPERATIONS[op].tool_name, body)
                assert result.is_error is True, (op, result)
                out.append(json.loads(result.content[0].text))
        return out

    assert anyio.run(main) == http_bodies
    assert s.git("rev-parse", "main").strip() == head


def test_alias_domain_chains_and_the_blocked_target(srv: tuple[LiveServer, str, str]) -> None:
    s, token, _ = srv
    with s.client(token) as c:
        # h0@a-old.example would be h0@a.example and its 8 steps, plus one: too long.
        r = c.post(f"{API}/add-alias-domain", json={"domain": "a-old.example", "target": "a.example"})
        assert assert_error(r, 409, "alias_chain_too_long")["target"] == "h0@a-old.example"
        assert c.post(f"{API}/remove-alias", json={"address": "h0@a.example"}).json()["removed"] is True
        assert (
            c.post(f"{API}/add-alias-domain", json={"domain": "a-old.example", "target": "a.example"}).status_code
            == 200
        )
        assert_error(c.post(f"{API}/disable-email", json={"domain": "a.example"}), 409, "active_mailboxes_remain")
        assert_error(
            c.post(f"{API}/add-alias", json={"address": "@a-old.example", "destinations": ["info@a.example"]}),
            409,
            "address_in_use",
        )
        assert_error(
            c.post(f"{API}/add-alias-domain", json={"domain": "a.example", "target": "a-old.example"}),
            409,
            "alias_domain_target_invalid",
        )
        assert c.post(f"{API}/remove-alias-domain", json={"domain": "a-old.example"}).json()["alias_of"] is None
