"""Pagination of the list operations (state/paging.py): keyset cursors that stay stable while
real signed writes land between pages, the spec's unpaged answers, and clear errors for a bad
`limit` or `cursor` over HTTP and MCP."""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailstate.state import paging
from mailstate.state.errors import InvalidInput
from mailstate.state.models import RESPONSES
from mailstate.state.snapshot import Actor
from mailstate.state.store import Store
from tests.helpers.common import ADMIN, PASSWORD, commit_count
from tests.helpers.mcp import body_of, http_session
from tests.helpers.openapi import call_endpoint, client_module
from tests.helpers.server import LiveServer, assert_error, live_server

pytestmark = pytest.mark.e2e

API = "/v1/email-account"
_projects = itertools.count(1000)


def _keys(name: str, body: dict[str, Any]) -> list[Any]:
    """The listing's keys, in the order answered."""
    if name == "list-users":
        return [tuple(u["email"].split("@")[::-1]) for u in body["users"]]
    if name == "list-aliases":
        return [(a["domain"], a["address"].split("@")[0] or "@") for a in body["aliases"]]
    if name == "list-domains":
        return [d["domain"] for d in body["domains"] + body["linked_not_enabled"]]
    return [n["name"] for n in body["nodes"]]


def _all(store: Store, name: str, actor: Actor, **extra: Any) -> list[Any]:
    body = store.execute(name, actor, extra).result
    assert "next_cursor" not in body  # the unpaged answer is the spec's shape
    keys = _keys(name, body)
    return sorted(keys) if name == "list-domains" else keys


def _project_world(store: Store, domains: int, boxes: int, aliases: int) -> tuple[Actor, list[str]]:
    pid = next(_projects)
    actor = Actor.project(pid)
    names = [f"d{i:02d}-p{pid}.example" for i in range(domains)]
    for i, name in enumerate(names):
        store.execute("link-domain", ADMIN, {"domain": name, "project_id": pid})
        if i % 4 == 3:
            continue  # linked, email not enabled: list-domains' linked_not_enabled
        store.execute("enable-email", actor, {"domain": name})
        for j in range(boxes):
            store.execute("add-user", actor, {"email": f"u{j:02d}@{name}", "password": PASSWORD})
        for j in range(aliases):
            store.execute(
                "add-alias",
                actor,
                {"address": f"a{j:02d}@{name}" if j else f"@{name}", "destinations": ["x@example.org"]},
            )
    return actor, names


# One real write between two pages: what it adds is new (never listed before), what it removes
# existed from the start; so "existed throughout" is the start's entries minus the removed ones.
WRITES = st.lists(
    st.sampled_from(["add-user", "remove-user", "add-alias", "remove-alias", "link-domain", "unlink-domain"]),
    max_size=12,
)


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    listing=st.sampled_from(["list-users", "list-aliases", "list-domains"]),
    limit=st.integers(min_value=1, max_value=7),
    writes=WRITES,
    data=st.data(),
)
def test_pages_stay_stable_under_concurrent_writes(
    store: Store, listing: str, limit: int, writes: list[str], data: st.DataObject
) -> None:
    actor, names = _project_world(store, domains=4, boxes=3, aliases=2)
    enabled = [n for i, n in enumerate(names) if i % 4 != 3]
    start = _all(store, listing, actor)
    removed: set[Any] = set()
    fresh = itertools.count()
    seen: list[Any] = []
    cursor: str | None = None
    writes_left = list(writes)
    for _ in range(500):
        req: dict[str, Any] = {"limit": limit} if cursor is None else {"limit": limit, "cursor": cursor}
        body = store.execute(listing, actor, req).result
        RESPONSES[listing].model_validate(body)
        page = _keys(listing, body)
        assert len(page) <= limit
        seen.extend(page)
        cursor = body["next_cursor"]
        if cursor is None:
            break
        # A real signed write between two pages.
        if writes_left:
            kind = writes_left.pop()
            dom = data.draw(st.sampled_from(enabled))
            if kind == "add-user":
                store.execute("add-user", actor, {"email": f"new{next(fresh)}@{dom}", "password": PASSWORD})
            elif kind == "remove-user":
                left = [k for k in start if listing == "list-users" and k not in removed]
                victim = data.draw(st.sampled_from(left)) if left else None
                if victim is not None:
                    store.execute("remove-user", actor, {"email": f"{victim[1]}@{victim[0]}", "hard_delete": True})
                    removed.add(victim)
            elif kind == "add-alias":
                store.execute(
                    "add-alias", actor, {"address": f"new{next(fresh)}@{dom}", "destinations": ["y@example.org"]}
                )
            elif kind == "remove-alias":
                left = [k for k in start if listing == "list-aliases" and k not in removed and k[1] != "@"]
                victim = data.draw(st.sampled_from(left)) if left else None
                if victim is not None:
                    store.execute("remove-alias", actor, {"address": f"{victim[1]}@{victim[0]}"})
                    removed.add(victim)
            elif kind == "link-domain":
                store.execute(
                    "link-domain", ADMIN, {"domain": f"new{next(fresh)}-{names[0]}", "project_id": actor.project_id}
                )
            else:
                left = [k for k in start if listing == "list-domains" and k not in removed and k not in enabled]
                victim = data.draw(st.sampled_from(left)) if left else None
                if victim is not None:
                    store.execute("unlink-domain", ADMIN, {"domain": victim})
                    removed.add(victim)
    else:
        pytest.fail("the pages never ended")
    assert cursor is None
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    if listing != "list-domains":
        assert seen == sorted(seen)  # the listing's own order, across pages
    throughout = [k for k in start if k not in removed]
    assert set(throughout) <= set(seen), "an entry that existed throughout was skipped"
    assert set(seen) <= set(start) | set(_all(store, listing, actor)) | removed


def test_pages_concatenate_to_the_unpaged_answer(store: Store) -> None:
    actor, names = _project_world(store, domains=6, boxes=4, aliases=3)
    for listing, extra in (
        ("list-users", {}),
        ("list-users", {"domain": names[1]}),
        ("list-aliases", {}),
        ("list-domains", {}),
    ):
        whole = store.execute(listing, actor, extra).result
        for limit in (1, 2, 5, paging.PAGE_MAX):
            merged: dict[str, list[Any]] = {}
            cursor = None
            while True:
                body = store.execute(
                    listing, actor, {**extra, "limit": limit, **({"cursor": cursor} if cursor else {})}
                ).result
                for key, value in body.items():
                    if key != "next_cursor":
                        merged.setdefault(key, []).extend(value)
                cursor = body["next_cursor"]
                if cursor is None:
                    break
            assert merged == whole, (listing, extra, limit)


def test_admin_pages_every_domain_and_node(store: Store) -> None:
    _project_world(store, domains=3, boxes=1, aliases=0)
    for i in range(5):
        store.execute("add-node", ADMIN, {"name": f"n{i}"})
    for listing in ("list-domains", "list-nodes"):
        whole = _all(store, listing, ADMIN)
        first = store.execute(listing, ADMIN, {"limit": 2}).result
        assert _keys(listing, first) == whole[:2] and first["next_cursor"]
        rest = store.execute(listing, ADMIN, {"cursor": first["next_cursor"]}).result  # cursor without limit: the rest
        assert _keys(listing, rest) == whole[2:] and rest["next_cursor"] is None
    # A last page that ends exactly at the end says so (null), without an empty page after it.
    nodes = store.execute("list-nodes", ADMIN, {"limit": 5}).result
    assert len(nodes["nodes"]) == 5 and nodes["next_cursor"] is None


def test_an_empty_listing_pages_to_null(store: Store) -> None:
    actor = Actor.project(next(_projects))
    for listing in ("list-users", "list-aliases", "list-domains"):
        body = store.execute(listing, actor, {"limit": 3}).result
        assert _keys(listing, body) == [] and body["next_cursor"] is None


def _cursor(parts: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).rstrip(b"=").decode()


BAD_LIMITS = [0, -1, paging.PAGE_MAX + 1, "0", "abc", "", "1.5", "1e3", "+5", " 5", True, 2.0, [5], "\uff11\uff12"]


def test_bad_limits_and_cursors_are_invalid_input(store: Store) -> None:
    actor, names = _project_world(store, domains=2, boxes=3, aliases=0)
    for value in BAD_LIMITS:
        with pytest.raises(InvalidInput) as exc:
            store.execute("list-users", actor, {"limit": value})
        assert (exc.value.code, exc.value.field) == ("invalid_limit", "limit"), value
    good = store.execute("list-users", actor, {"limit": 1, "domain": names[0]}).result["next_cursor"]
    bad = [
        "!!!",
        "a" * (paging.MAX_CURSOR_CHARS + 1),
        "x",
        _cursor({"a": 1}),
        _cursor([2, "list-users", "", "a", "b"]),
        _cursor([1, "list-users", "", "a"]),
        _cursor([1, "list-users", "", "a", 5]),
        _cursor([1, "list-domains", "", "a"]),
        base64.urlsafe_b64encode(b"\xff\xfe").decode().rstrip("="),
        12,
    ]
    for cursor in bad:
        with pytest.raises(InvalidInput) as exc:
            store.execute("list-users", actor, {"cursor": cursor})
        assert (exc.value.code, exc.value.field) == ("invalid_cursor", "cursor"), cursor
    # A cursor belongs to its listing and filter.
    for name, req in (
        ("list-users", {"cursor": good}),
        ("list-users", {"cursor": good, "domain": names[1]}),
        ("list-aliases", {"cursor": good}),
    ):
        with pytest.raises(InvalidInput) as exc:
            store.execute(name, actor, req)
        assert exc.value.code == "invalid_cursor"
    rest = store.execute("list-users", actor, {"cursor": good, "domain": names[0]}).result
    assert [u["email"] for u in rest["users"]] == [f"u01@{names[0]}", f"u02@{names[0]}"] and rest["next_cursor"] is None


# --- the edges --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("paging")) as server:
        with server.client(server.admin_token) as admin:
            for name in ("p1.example", "p2.example"):
                assert admin.post(f"{API}/add-domain", json={"domain": name, "project_id": 7}).status_code == 201
                for i in range(3):
                    assert (
                        admin.post(f"{API}/add-user", json={"email": f"u{i}@{name}", "password": PASSWORD}).status_code
                        == 201
                    )
        yield server


def test_http_pages_and_keeps_the_spec_answer(srv: LiveServer) -> None:
    with srv.client(srv.create_token(project=7)) as c:
        whole = c.get(f"{API}/list-users").json()
        assert set(whole) == {"users"} and len(whole["users"]) == 6
        emails: list[str] = []
        params: dict[str, Any] = {"limit": "4"}
        while True:
            r = c.get(f"{API}/list-users", params=params)
            assert r.status_code == 200, r.text
            emails += [u["email"] for u in r.json()["users"]]
            if r.json()["next_cursor"] is None:
                break
            params = {"limit": "4", "cursor": r.json()["next_cursor"]}
        assert emails == [u["email"] for u in whole["users"]]


def test_http_bad_limit_or_cursor_is_a_clear_400(srv: LiveServer) -> None:
    before = commit_count(srv.data.repo)
    with srv.client(srv.create_token(project=7)) as c, srv.client(srv.admin_token) as admin:
        for name in ("list-users", "list-domains", "list-aliases"):
            for limit in ("0", "1001", "abc", "", "-3", "2.5"):
                err = assert_error(c.get(f"{API}/{name}", params={"limit": limit}), (400, 422), "invalid_limit")
                assert "1 to 1000" in err["message"]
            for cursor in ("%%%", "bm9wZQ", "x" * 2000):
                assert_error(c.get(f"{API}/{name}", params={"cursor": cursor}), (400, 422), "invalid_cursor")
        other = c.get(f"{API}/list-domains", params={"limit": "1"}).json()["next_cursor"]
        assert_error(c.get(f"{API}/list-users", params={"cursor": other}), (400, 422), "invalid_cursor")
        assert_error(admin.get(f"{API}/list-nodes", params={"limit": "0"}), (400, 422), "invalid_limit")
        assert_error(c.get(f"{API}/list-users", params=[("limit", "1"), ("limit", "2")]), (400, 422), "invalid_request")
    assert commit_count(srv.data.repo) == before


def test_mcp_tools_page_too(srv: LiveServer) -> None:
    token = srv.create_token(project=7)

    async def main() -> tuple[list[str], Any]:
        emails: list[str] = []
        async with http_session(srv, token) as s:
            args: dict[str, Any] = {"limit": 2}
            while True:
                body = body_of(await s.call_tool("email_account_list_users", args))
                emails += [u["email"] for u in body["users"]]
                if body["next_cursor"] is None:
                    break
                args = {"limit": 2, "cursor": body["next_cursor"]}
            bad = await s.call_tool("email_account_list_domains", {"limit": 0})
        return emails, bad

    emails, bad = anyio.run(main)
    assert emails == sorted(emails, key=lambda e: e.split("@")[::-1]) and len(emails) == 6
    assert bad.is_error is True and json.loads(bad.content[0].text)["error"]["code"] == "invalid_limit"


def test_the_generated_client_pages(srv: LiveServer, request: pytest.FixtureRequest) -> None:
    """A client generated from the live OpenAPI (tests/api/conftest.py's fixture) sends
    limit and cursor as typed query parameters and reads next_cursor as a documented field."""
    pkg: ModuleType = request.getfixturevalue("client_pkg")
    project = pkg.AuthenticatedClient(
        base_url=srv.url, token=srv.create_token(project=7), raise_on_unexpected_status=True
    )
    emails: list[str] = []
    cursor: Any = client_module("types").UNSET
    while True:
        page = call_endpoint(project, "email_account", "list-users", 200, "ListUsersResponse", limit=4, cursor=cursor)
        emails += [u.email for u in page.users]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert len(emails) == 6 and emails == sorted(emails, key=lambda e: e.split("@")[::-1])
    domains = call_endpoint(project, "email_account", "list-domains", 200, "ListDomainsResponse", limit=1)
    assert [d.domain for d in domains.domains] == ["p1.example"] and isinstance(domains.next_cursor, str)
    err = call_endpoint(project, "email_account", "list-users", 400, "ErrorResponse", limit=1, cursor="not-a-cursor")
    assert err.error.code == "invalid_cursor"
