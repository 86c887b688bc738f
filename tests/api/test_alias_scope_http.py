"""Another project's aliases never decide a verdict and never show, through a real `mailstate
serve`: over HTTP, for a loop and for a chain's depth that run into another project's domain,
and through the official MCP client (the tools call the same operation).

The rule itself, at the library level: tests/state/test_alias_scope.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.helpers.common import PASSWORD
from tests.helpers.server import LiveServer

pytestmark = pytest.mark.e2e

API = "/v1/email-account"


@dataclass
class Projects:
    """A live `mailstate serve` with clients for projects 42 and 43 and their admin."""

    server: LiveServer
    admin: httpx.Client
    p42: httpx.Client
    p43: httpx.Client
    tokens: dict[int, str]

    def domains(self, prefix: str) -> tuple[str, str]:
        """(project 42's domain, project 43's domain), linked and email-enabled, 43's with a mailbox."""
        mine, theirs = f"{prefix}.p42.example", f"{prefix}.p43.example"
        for domain, project, client in ((mine, 42, self.p42), (theirs, 43, self.p43)):
            r = self.admin.post(f"{API}/link-domain", json={"domain": domain, "project_id": project})
            assert r.status_code == 201, r.text
            assert client.post(f"{API}/enable-email", json={"domain": domain}).status_code == 200
        r = self.p43.post(f"{API}/add-user", json={"email": f"info@{theirs}", "password": PASSWORD})
        assert r.status_code == 201, r.text
        return mine, theirs

    def alias(self, client: httpx.Client, address: str, destinations: list[str]) -> httpx.Response:
        return client.post(f"{API}/add-alias", json={"address": address, "destinations": destinations})


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Projects]:
    server = LiveServer(tmp_path_factory.mktemp("scope"))
    server.start()
    tokens = {p: server.create_token(project=p, name=f"p{p}") for p in (42, 43)}
    with server.client(server.admin_token) as admin, server.client(tokens[42]) as p42, server.client(tokens[43]) as p43:
        try:
            yield Projects(server, admin, p42, p43, tokens)
        finally:
            server.stop()


def test_another_projects_loop_is_not_a_verdict_nor_shown_over_http(projects: Projects) -> None:
    s = projects
    mine, theirs = s.domains("loop")
    # Project 43's half of a loop, and project 42's: 42's chain ends where it enters 43's domain.
    assert s.alias(s.p43, f"loop@{theirs}", [f"back@{mine}"]).status_code == 201
    r = s.alias(s.p42, f"back@{mine}", [f"loop@{theirs}"])
    assert r.status_code == 201, r.text
    # The same answer as for an address of 43's that leads nowhere: nothing to learn from it.
    assert s.alias(s.p42, f"back2@{mine}", [f"nothing@{theirs}"]).status_code == 201
    # 42's own loop is refused still, and its message names 42's addresses only.
    assert s.alias(s.p42, f"a@{mine}", [f"loop@{theirs}", f"b@{mine}"]).status_code == 201
    r = s.alias(s.p42, f"b@{mine}", [f"a@{mine}"])
    assert r.status_code == 409 and r.json()["error"]["code"] == "alias_loop", r.text
    assert f"a@{mine}" in r.text and theirs not in r.text, r.text
    # Project 43 closing a loop through 42's aliases gets the same: 42's data decides nothing.
    assert s.alias(s.p43, f"back@{theirs}", [f"a@{mine}"]).status_code == 201


def test_another_projects_chain_depth_is_not_a_verdict_nor_shown_over_http(projects: Projects) -> None:
    s = projects
    mine, theirs = s.domains("depth")
    # Eight steps in 43's domain, the most a chain may have.
    for i in range(8, 0, -1):
        target = f"y{i + 1}@{theirs}" if i < 8 else f"info@{theirs}"
        assert s.alias(s.p43, f"y{i}@{theirs}", [target]).status_code == 201
    r = s.alias(s.p42, f"z@{mine}", [f"y1@{theirs}"])
    assert r.status_code == 201, r.text  # 42's chain is one step long: it ends at 43's domain
    # 42's own chain of eight through the hop into 43, then a ninth step of its own: refused,
    # with a message about 42's address only.
    for i in range(8, 0, -1):
        target = f"w{i + 1}@{mine}" if i < 8 else f"y1@{theirs}"
        assert s.alias(s.p42, f"w{i}@{mine}", [target]).status_code == 201
    r = s.alias(s.p42, f"top@{mine}", [f"w1@{mine}"])
    assert r.status_code == 409 and r.json()["error"]["code"] == "alias_chain_too_long", r.text
    assert f"top@{mine}" in r.text and theirs not in r.text, r.text


@asynccontextmanager
async def _mcp(server: LiveServer, token: str) -> AsyncIterator[ClientSession]:
    """The official MCP client over streamable HTTP at /mcp, as project `token`."""
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as client,
        streamable_http_client(f"{server.url}/mcp", http_client=client) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def test_mcp_tools_get_the_same_verdicts(projects: Projects) -> None:
    """The tools call the same operation: loop and depth through another project are no verdict,
    and the project's own loop is refused with its own addresses only."""
    s = projects
    mine, theirs = s.domains("mcp")
    assert s.alias(s.p43, f"loop@{theirs}", [f"back@{mine}"]).status_code == 201
    for i in range(8, 0, -1):
        target = f"y{i + 1}@{theirs}" if i < 8 else f"info@{theirs}"
        assert s.alias(s.p43, f"y{i}@{theirs}", [target]).status_code == 201

    async def calls() -> list[tuple[bool, dict[str, Any]]]:
        out = []
        async with _mcp(s.server, s.tokens[42]) as session:
            for address, dests in (
                (f"back@{mine}", [f"loop@{theirs}"]),
                (f"z@{mine}", [f"y1@{theirs}"]),
                (f"a@{mine}", [f"back@{mine}"]),
                (f"loop2@{mine}", [f"a@{mine}"]),
            ):
                result = await session.call_tool("email_account_add_alias", {"address": address, "destinations": dests})
                out.append((bool(result.is_error), json.loads(result.content[0].text)))  # type: ignore[union-attr]
            # a -> back -> (43's loop@, where 42's chain ends): fine; now close 42's own loop.
            result = await session.call_tool(
                "email_account_update_alias", {"address": f"back@{mine}", "destinations": [f"loop2@{mine}"]}
            )
            out.append((bool(result.is_error), json.loads(result.content[0].text)))  # type: ignore[union-attr]
        return out

    results = anyio.run(calls)
    assert [error for error, _ in results] == [False, False, False, False, True], results
    body = results[-1][1]
    assert body["error"]["code"] == "alias_loop" and theirs not in json.dumps(body), body
