"""The HTTP API against a real `mailstate serve` (uvicorn on a loopback port), driven with httpx:
every endpoint's success path, every error status in the one error shape, and the commits the
writes leave in DIR/state.git (trailers, signatures, no secrets)."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.helpers.server import LiveServer, assert_error, live_server

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery"
SHA = re.compile(r"^[0-9a-f]{40}$")
API = "/v1/email-account"


@dataclass
class World:
    srv: LiveServer
    admin: httpx.Client
    a: httpx.Client
    b: httpx.Client
    secrets: list[str] = field(default_factory=list)

    def post(self, client: httpx.Client, name: str, body: object) -> httpx.Response:
        return client.post(f"{API}/{name}", json=body)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("http")) as server:
        yield server


@pytest.fixture(scope="module")
def world(srv: LiveServer) -> Iterator[World]:
    tok_a = srv.create_token(project=101, name="project-a")
    tok_b = srv.create_token(project=202, name="project-b")
    w = World(
        srv,
        srv.client(srv.admin_token),
        srv.client(tok_a),
        srv.client(tok_b),
        [srv.admin_token, tok_a, tok_b, PASSWORD],
    )
    for client, domain, project in ((w.a, "a.example", 101), (w.b, "b.example", 202)):
        assert w.post(w.admin, "link-domain", {"domain": domain, "project_id": project}).status_code == 201
        assert w.post(client, "enable-email", {"domain": domain}).status_code == 200
        assert w.post(client, "add-user", {"email": f"info@{domain}", "password": PASSWORD}).status_code == 201
    yield w
    for c in (w.admin, w.a, w.b):
        c.close()


def head(srv: LiveServer) -> str:
    return srv.git("rev-parse", "main").strip()


def test_serve_printed_the_admin_token_once(srv: LiveServer) -> None:
    assert srv.stdout.count(srv.admin_token) == 1
    assert "shown ONCE" in srv.stdout
    assert srv.admin_token not in srv.log_text()
    tokens = srv.cli("token", "list", "--data", str(srv.data.root), "--json").stdout
    assert '"role": "admin"' in tokens and srv.admin_token not in tokens


def test_health(world: World) -> None:
    srv = world.srv
    assert httpx.get(f"{srv.url}/v1/health").json() == {"status": "ok"}
    assert world.a.get("/v1/health").json() == {"status": "ok"}  # a project token: status only too
    body = world.admin.get("/v1/health").json()
    assert body["status"] == "ok" and body["mode"] == "local"
    assert body["head"] == head(srv)
    assert_error(
        httpx.get(f"{srv.url}/v1/health", headers={"Authorization": "Bearer mst_nope"}), 401, "unauthenticated"
    )


def test_health_shows_a_refused_commit_to_admins_only(tmp_path: Path) -> None:
    with live_server(tmp_path / "srv") as srv, srv.client(srv.admin_token) as admin:
        assert admin.post(f"{API}/add-domain", json={"domain": "secret-customer.example"}).status_code == 201
        work = tmp_path / "work"
        srv.git("clone", "-q", str(srv.data.repo), str(work))
        path = next(work.glob("domains/*/secret-customer.example.yaml"))
        path.write_text(path.read_text() + "# sneaky\n")
        for args in (
            ("add", "-A"),
            ("-c", "user.name=x", "-c", "user.email=x@example.org", "commit", "-qm", "unsigned"),
            ("push", "-q", "origin", "main"),
        ):
            subprocess.run(["git", "-C", str(work), *args], check=True, env=srv.env, capture_output=True)
        admin.get(f"{API}/list-domains")  # any request notices the foreign commit

        def degraded() -> bool:
            return bool(httpx.get(f"{srv.url}/v1/health").json()["status"] == "degraded")

        deadline = time.monotonic() + 10
        while not degraded() and time.monotonic() < deadline:
            time.sleep(0.1)
        anonymous = httpx.get(f"{srv.url}/v1/health")
        assert anonymous.json() == {"status": "degraded"}
        assert "secret-customer" not in anonymous.text and "domains/" not in anonymous.text
        full = admin.get("/v1/health").json()
        assert full["status"] == "degraded"
        assert "not signed by a trusted key" in full["refused_commit"]["problems"][0]


# --- success paths -------------------------------------------------------------------------


def test_every_endpoint_success_path(world: World) -> None:
    srv, admin, a = world.srv, world.admin, world.a
    before = srv.commit_count()
    writes = []

    def write(client: httpx.Client, name: str, body: dict[str, object], status: int = 200) -> dict[str, object]:
        r = world.post(client, name, body)
        assert r.status_code == status, r.text
        data = r.json()
        assert isinstance(data["commit"], str) and SHA.match(data["commit"]), data
        assert data["commit"] == head(srv)
        assert r.headers["x-request-id"] and r.headers["cache-control"] == "no-store"
        writes.append(name)
        return data

    # Domains tab + email on/off, as a project.
    assert write(admin, "link-domain", {"domain": "shop.example", "project_id": 101}, 201)["project_id"] == 101
    assert write(a, "enable-email", {"domain": "shop.example"})["email_enabled"] is True
    created = write(a, "add-user", {"email": "Sales@Shop.example", "password": PASSWORD, "quota_mb": 2048}, 201)
    assert created["email"] == "sales@shop.example" and created["quota_mb"] == 2048 and created["active"] is True
    write(a, "add-user", {"email": "tmp@shop.example", "password": PASSWORD}, 201)

    users = a.get(f"{API}/list-users", params={"domain": "shop.example"})
    assert users.status_code == 200
    listed = users.json()["users"]
    assert [u["email"] for u in listed] == ["sales@shop.example", "tmp@shop.example"]
    assert all("password" not in u and "hash" not in str(u).lower() for u in listed)
    assert {u["email"] for u in a.get(f"{API}/list-users").json()["users"]} >= {"info@a.example", "sales@shop.example"}

    domains = a.get(f"{API}/list-domains").json()["domains"]
    shop = next(d for d in domains if d["domain"] == "shop.example")
    assert shop["active_mailboxes"] == 2 and shop["mailboxes"] == 2

    assert (
        write(a, "update-password", {"email": "sales@shop.example", "password": "another password"})["updated"] is True
    )
    soft = write(a, "remove-user", {"email": "tmp@shop.example"})
    assert soft["active"] is False and soft["hard_delete"] is False
    hard = write(a, "remove-user", {"email": "tmp@shop.example", "hard_delete": True})
    assert hard["hard_delete"] is True
    write(a, "remove-user", {"email": "sales@shop.example", "hard_delete": True})
    assert write(a, "disable-email", {"domain": "shop.example"})["email_enabled"] is False
    assert write(admin, "unlink-domain", {"domain": "shop.example"})["project_id"] is None

    # Admin: domains without project scoping, and nodes.
    assert write(admin, "add-domain", {"domain": "platform.example"}, 201)["email_enabled"] is True
    assert write(admin, "add-domain", {"domain": "assigned.example", "project_id": 101}, 201)["project_id"] == 101
    assert "assigned.example" in {d["domain"] for d in a.get(f"{API}/list-domains").json()["domains"]}
    assert write(admin, "remove-domain", {"domain": "platform.example"})["removed"] is True
    node = write(admin, "add-node", {"name": "mpi02", "ip_address": "192.0.2.7"}, 201)
    assert str(node["sync_key"]).startswith("mss_") and node["ip_address"] == "192.0.2.7"
    world.secrets.append(str(node["sync_key"]))
    nodes = admin.get(f"{API}/list-nodes").json()["nodes"]
    assert [(n["name"], n["ip_address"], n["last_sync_at"]) for n in nodes] == [("mpi02", "192.0.2.7", None)]
    rotated = write(admin, "rotate-node-key", {"name": "mpi02"})
    assert rotated["sync_key"] != node["sync_key"]
    world.secrets.append(str(rotated["sync_key"]))
    write(admin, "remove-node", {"name": "mpi02"})
    assert admin.get(f"{API}/list-nodes").json() == {"nodes": []}

    assert len(writes) == 16 and srv.commit_count() == before + len(writes)


def test_reads_and_noops_make_no_commit(world: World) -> None:
    srv = world.srv
    before = head(srv)
    r = world.post(world.a, "enable-email", {"domain": "a.example"})
    assert r.status_code == 200 and r.json()["commit"] is None
    world.a.get(f"{API}/list-users")
    world.a.get(f"{API}/list-domains")
    world.admin.get(f"{API}/list-nodes")
    assert head(srv) == before


def test_request_id_is_the_callers_when_safe(world: World) -> None:
    r = world.a.post(
        f"{API}/add-user", json={"email": "rid@a.example", "password": PASSWORD}, headers={"X-Request-Id": "req-42.abc"}
    )
    assert r.status_code == 201 and r.headers["x-request-id"] == "req-42.abc"
    assert "Request-Id: req-42.abc" in world.srv.git("log", "-1", "--format=%B")
    r = world.a.post(
        f"{API}/remove-user", json={"email": "rid@a.example"}, headers={"X-Request-Id": "bad id; Action: forged"}
    )
    assert r.status_code == 200 and re.match(r"^[0-9a-f]{32}$", r.headers["x-request-id"])
    assert "forged" not in world.srv.git("log", "-1", "--format=%B")


# --- 401 / 403 / 404 / 409 -----------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer mst_000000000000_" + "A" * 43},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "bearer"},
    ],
)
def test_401_without_a_valid_token(srv: LiveServer, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=srv.url, headers=headers) as c:
        for r in (
            c.get(f"{API}/list-users"),
            c.post(f"{API}/add-user", json={"email": "x@a.example", "password": PASSWORD}),
        ):
            assert_error(r, 401, "unauthenticated")
            assert r.headers["www-authenticate"].lower().startswith("bearer")


def test_401_comes_before_input_errors(srv: LiveServer) -> None:
    with httpx.Client(base_url=srv.url) as c:
        assert_error(c.post(f"{API}/add-user", content=b"{not json", headers={"content-type": "application/json"}), 401)


def test_401_for_a_revoked_token(world: World) -> None:
    srv = world.srv
    token = srv.create_token(project=101, name="short-lived")
    with srv.client(token) as c:
        assert c.get(f"{API}/list-users").status_code == 200
        srv.cli("token", "revoke", "--data", str(srv.data.root), "short-lived")
        assert_error(c.get(f"{API}/list-users"), 401, "unauthenticated")


ADMIN_CALLS = [
    ("POST", "add-domain", {"domain": "new.example"}),
    ("POST", "remove-domain", {"domain": "a.example"}),
    ("GET", "list-nodes", {}),
    ("POST", "add-node", {"name": "mpi09"}),
    ("POST", "link-domain", {"domain": "new.example", "project_id": 101}),
    ("POST", "unlink-domain", {"domain": "a.example"}),
    ("POST", "remove-node", {"name": "mpi09"}),
    ("POST", "rotate-node-key", {"name": "mpi09"}),
]


@pytest.mark.parametrize(("method", "name", "body"), ADMIN_CALLS, ids=[c[1] for c in ADMIN_CALLS])
def test_403_project_token_on_admin_endpoint(world: World, method: str, name: str, body: dict[str, object]) -> None:
    before = head(world.srv)
    r = world.a.request(method, f"{API}/{name}", **({"params": body} if method == "GET" else {"json": body}))
    assert_error(r, 403, "admin_required")
    # Even with a body that would not validate, the role is checked first.
    if method == "POST":
        assert_error(world.a.post(f"{API}/{name}", json={"nonsense": 1}), 403, "admin_required")
    assert head(world.srv) == before


def test_404_for_another_projects_domain_and_mailbox(world: World) -> None:
    a = world.a
    assert_error(a.get(f"{API}/list-users", params={"domain": "b.example"}), 404, "domain_not_found")
    assert_error(world.post(a, "enable-email", {"domain": "b.example"}), 404, "domain_not_found")
    assert_error(world.post(a, "disable-email", {"domain": "b.example"}), 404, "domain_not_found")
    assert_error(world.post(a, "add-user", {"email": "x@b.example", "password": PASSWORD}), 404, "domain_not_found")
    assert_error(
        world.post(a, "update-password", {"email": "info@b.example", "password": PASSWORD}), 404, "mailbox_not_found"
    )
    assert_error(world.post(a, "remove-user", {"email": "info@b.example"}), 404, "mailbox_not_found")
    # Absent and foreign read the same.
    foreign = world.post(a, "remove-user", {"email": "info@b.example"}).json()["error"]["message"]
    absent = world.post(a, "remove-user", {"email": "info@nowhere.example"}).json()["error"]["message"]
    assert foreign.replace("b.example", "X") == absent.replace("nowhere.example", "X")
    assert_error(world.post(world.admin, "remove-node", {"name": "ghost"}), 404, "node_not_found")


def test_409_conflicts(world: World) -> None:
    a, admin = world.a, world.admin
    assert_error(world.post(a, "add-user", {"email": "info@a.example", "password": PASSWORD}), 409, "mailbox_exists")
    assert_error(world.post(a, "disable-email", {"domain": "a.example"}), 409, "active_mailboxes_remain")
    assert_error(world.post(admin, "remove-domain", {"domain": "a.example"}), 409, "active_mailboxes_remain")
    assert_error(world.post(admin, "add-domain", {"domain": "a.example"}), 409, "domain_exists")
    assert_error(
        world.post(admin, "link-domain", {"domain": "a.example", "project_id": 202}), 409, "domain_linked_elsewhere"
    )
    assert_error(world.post(admin, "unlink-domain", {"domain": "a.example"}), 409, "email_enabled")
    assert world.post(admin, "link-domain", {"domain": "later.example", "project_id": 101}).status_code == 201
    assert_error(
        world.post(a, "add-user", {"email": "x@later.example", "password": PASSWORD}), 409, "email_not_enabled"
    )
    assert world.post(admin, "add-node", {"name": "dup"}).status_code == 201
    assert_error(world.post(admin, "add-node", {"name": "dup"}), 409, "node_exists")
    assert world.post(a, "add-user", {"email": "gone@a.example", "password": PASSWORD}).status_code == 201
    assert world.post(a, "remove-user", {"email": "gone@a.example"}).status_code == 200
    assert_error(
        world.post(a, "update-password", {"email": "gone@a.example", "password": PASSWORD}), 409, "mailbox_inactive"
    )
    assert_error(world.post(a, "add-user", {"email": "gone@a.example", "password": PASSWORD}), 409, "mailbox_exists")


# --- 400: invalid input, always in the one shape --------------------------------------------


def raw(world: World, name: str, content: bytes, ctype: str | None = "application/json") -> httpx.Response:
    headers = {"content-type": ctype} if ctype else {}
    return world.a.post(f"{API}/{name}", content=content, headers=headers)


@pytest.mark.parametrize(
    ("content", "ctype"),
    [
        (b"{not json", "application/json"),
        (b'{"email": "x@a.example",', "application/json"),
        (b"\xff\xfe\x00garbage", "application/json"),
        (b'{"email": NaN}', "application/json"),
        (b"[" * 100_00 + b"]" * 100_00, "application/json"),
        (b'["a", "b"]', "application/json"),
        (b'"a string"', "application/json"),
        (b"null", "application/json"),
        (b"42", "application/json"),
        (b'{"email": "x@a.example", "password": "correct horse battery"}', "text/plain"),
        (b"email=x%40a.example&password=secret", "application/x-www-form-urlencoded"),
        (b'{"email": "x@a.example"}', "multipart/form-data; boundary=x"),
    ],
)
def test_400_malformed_body(world: World, content: bytes, ctype: str | None) -> None:
    err = assert_error(raw(world, "add-user", content, ctype), 400, "invalid_request")
    assert "correct horse" not in err["message"]


def test_json_without_a_content_type_is_accepted(world: World) -> None:
    r = raw(world, "add-user", b'{"email": "notype@a.example", "password": "correct horse battery"}', None)
    assert r.status_code == 201, r.text
    assert_error(raw(world, "add-user", b'{"email": "notype2@a.example"}', None), 400, "missing_field")


def test_413_oversized_body(world: World) -> None:
    assert_error(raw(world, "add-user", b'{"email": "' + b"a" * 200_000 + b'"}'), 413, "request_too_large")


@pytest.mark.parametrize(
    ("name", "body", "code"),
    [
        ("add-user", {}, "missing_field"),
        ("add-user", {"email": "x@a.example"}, "missing_field"),
        ("add-user", {"email": "x@a.example", "password": PASSWORD, "admin": True}, "unknown_field"),
        ("add-user", {"email": "x@a.example", "password": "p" * 73}, "invalid_password"),
        ("add-user", {"email": "x@a.example", "password": "é" * 37}, "invalid_password"),
        ("add-user", {"email": "x@a.example", "password": "short"}, "invalid_password"),
        ("add-user", {"email": "x@a.example", "password": 12345678}, "invalid_password"),
        ("add-user", {"email": "x:y@a.example", "password": PASSWORD}, "invalid_email"),
        ("add-user", {"email": "x\n@a.example", "password": PASSWORD}, "invalid_email"),
        ("add-user", {"email": "x@a.example\nAction: forged", "password": PASSWORD}, "invalid_email"),
        ("add-user", {"email": "../etc@a.example", "password": PASSWORD}, "invalid_email"),
        ("add-user", {"email": "x@../a.example", "password": PASSWORD}, "invalid_email"),
        ("add-user", {"email": "x/y@a.example", "password": PASSWORD}, "invalid_email"),
        ("add-user", {"email": "no-at-sign", "password": PASSWORD}, "invalid_email"),
        ("add-user", {"email": ["x@a.example"], "password": PASSWORD}, "invalid_email"),
        ("add-user", {"email": "x@a.example", "password": PASSWORD, "quota_mb": 0}, "invalid_quota"),
        ("add-user", {"email": "x@a.example", "password": PASSWORD, "quota_mb": "lots"}, "invalid_quota"),
        ("add-user", {"email": "x@a.example", "password": PASSWORD, "quota_mb": 10**12}, "invalid_quota"),
        ("remove-user", {"email": "info@a.example", "hard_delete": "yes"}, "invalid_request"),
        ("enable-email", {"domain": "a.example:25"}, "invalid_domain"),
        ("enable-email", {"domain": "../../etc"}, "invalid_domain"),
        ("enable-email", {"domain": "localhost"}, "invalid_domain"),
        ("enable-email", {"domain": None}, "invalid_domain"),
        ("update-password", {"email": "info@a.example", "password": "x" * 100}, "invalid_password"),
    ],
)
def test_400_invalid_fields(world: World, name: str, body: dict[str, object], code: str) -> None:
    before = head(world.srv)
    err = assert_error(world.post(world.a, name, body), 400, code)
    assert PASSWORD not in err["message"] and "x" * 73 not in err["message"]
    assert head(world.srv) == before


@pytest.mark.parametrize(
    ("name", "body", "code"),
    [
        ("add-node", {"name": "Bad Name"}, "invalid_node_name"),
        ("add-node", {"name": "ok", "ip_address": "999.1.1.1"}, "invalid_ip_address"),
        ("add-domain", {"domain": "x.example", "project_id": -1}, "invalid_project_id"),
        ("add-domain", {"domain": "x.example", "project_id": "seven"}, "invalid_project_id"),
        ("link-domain", {"domain": "x.example"}, "missing_field"),
    ],
)
def test_400_invalid_admin_fields(world: World, name: str, body: dict[str, object], code: str) -> None:
    assert_error(world.post(world.admin, name, body), 400, code)


def test_400_query_parameters(world: World) -> None:
    a = world.a
    assert_error(a.get(f"{API}/list-users", params={"domian": "a.example"}), 400, "unknown_field")
    assert_error(a.get(f"{API}/list-users?domain=a.example&domain=b.example"), 400, "invalid_request")
    assert_error(a.get(f"{API}/list-users", params={"domain": "a.example/../x"}), 400, "invalid_domain")
    assert_error(a.get(f"{API}/list-domains", params={"x": "1"}), 400, "unknown_field")


def test_router_errors_use_the_one_shape(world: World) -> None:
    a = world.a
    assert_error(a.get("/nope"), 404, "not_found")
    assert_error(a.get(f"{API}/no-such-endpoint"), 404, "not_found")
    assert_error(a.post(f"{API}/list-users", json={}), 405, "method_not_allowed")
    assert_error(a.get(f"{API}/add-user"), 405, "method_not_allowed")
    assert_error(a.delete(f"{API}/add-user"), 405, "method_not_allowed")
    assert_error(a.get("/v1/nodes/state.git/objects/info/packs"), (401, 404))


def test_never_leaks_the_password_or_token_into_responses_or_logs(world: World) -> None:
    secret = "s3cret-" + "q" * 70  # > 72 bytes, refused
    r = world.post(world.a, "add-user", {"email": "leak@a.example", "password": secret})
    assert secret not in r.text
    assert world.srv.admin_token not in world.srv.log_text()
    for s in world.secrets:
        assert s not in world.srv.log_text()


# --- OpenAPI / docs --------------------------------------------------------------------------


def test_openapi_lists_every_path_and_docs_answer(srv: LiveServer) -> None:
    spec = httpx.get(f"{srv.url}/openapi.json").json()
    paths = {p: set(v) for p, v in spec["paths"].items() if p.startswith(API)}
    expected = {
        "enable-email": "post",
        "disable-email": "post",
        "list-domains": "get",
        "add-user": "post",
        "remove-user": "post",
        "restore-user": "post",
        "list-users": "get",
        "update-password": "post",
        "add-domain": "post",
        "remove-domain": "post",
        "list-nodes": "get",
        "add-node": "post",
        "link-domain": "post",
        "unlink-domain": "post",
        "remove-node": "post",
        "rotate-node-key": "post",
        "add-alias": "post",
        "update-alias": "post",
        "remove-alias": "post",
        "list-aliases": "get",
        "set-forwarding": "post",
        "add-alias-domain": "post",
        "remove-alias-domain": "post",
        "dns-records": "get",
        "move-domain": "post",
        "set-node-address": "post",
        "set-replica": "post",
        "failover-node": "post",
        "set-spam-policy": "post",
        "list-spam-policy": "get",
        "add-sender-rule": "post",
        "list-sender-rules": "get",
        "remove-sender-rule": "post",
        "check-dns": "get",
        "mobileconfig": "get",
        "set-vacation": "post",
        "set-filters": "post",
        "list-filters": "get",
        "add-app-password": "post",
        "list-app-passwords": "get",
        "remove-app-password": "post",
        "set-limits": "post",
        "list-limits": "get",
        "set-quota": "post",
        "suspend-sending": "post",
        "resume-sending": "post",
        "add-webhook": "post",
        "list-webhooks": "get",
        "remove-webhook": "post",
    }
    assert paths == {f"{API}/{name}": {method} for name, method in expected.items()}
    add_user = spec["paths"][f"{API}/add-user"]["post"]
    ref = add_user["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert set(schema["properties"]) == {"email", "password", "quota_mb"} and schema["required"] == [
        "email",
        "password",
    ]
    params = spec["paths"][f"{API}/list-users"]["get"]["parameters"]
    # domain filters; limit and cursor page, all optional so the spec's call stays valid
    assert sorted((p["name"], p["in"], p["required"]) for p in params) == [
        ("cursor", "query", False),
        ("domain", "query", False),
        ("limit", "query", False),
    ]
    assert "422" not in add_user["responses"]
    assert set(add_user["responses"]) >= {"201", "405", "413"} and "200" not in add_user["responses"]


def test_docs_work_offline(srv: LiveServer) -> None:
    """/docs references only this server's own URLs (no CDN), and those assets are served."""
    page = httpx.get(f"{srv.url}/docs")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url\s*:\s*["']([^"']+)["']""", page.text)
    found = [u for pair in urls for u in pair if u]
    assert found, page.text
    for url in found:
        assert url.startswith("/") and not url.startswith("//"), url  # local only
        asset = httpx.get(f"{srv.url}{url}")
        assert asset.status_code == 200 and asset.content, url
    assert not re.search(r"https?://", page.text.replace("http://www.w3.org", "")), "the page names an outside URL"
    js = next(u for u in found if u.endswith(".js"))
    assert len(httpx.get(f"{srv.url}{js}").content) > 100_000  # the real Swagger UI bundle


# --- commits in DIR/state.git ------------------------------------------------------------------


def test_commits_are_signed_and_audited_by_token_name(world: World) -> None:
    srv = world.srv
    r = world.post(world.a, "add-user", {"email": "audit@a.example", "password": PASSWORD})
    assert r.status_code == 201
    sha = r.json()["commit"]
    msg = srv.git("log", "-1", "--format=%B", sha)
    assert msg.splitlines()[0] == "add-user audit@a.example"
    trailers = dict(
        line.split(": ", 1)
        for line in srv.git("log", "-1", "--format=%(trailers:only,unfold)", sha).strip().splitlines()
    )
    assert trailers["Action"] == "add-user"
    assert trailers["Project"] == "101"
    assert trailers["Actor"] == "token:project-a"
    assert trailers["Request-Id"]
    admin_sha = world.post(world.admin, "link-domain", {"domain": "audit.example", "project_id": 101}).json()["commit"]
    assert "Actor: token:admin" in srv.git("log", "-1", "--format=%B", admin_sha)
    for rev in srv.git("rev-list", "main").split():
        proc = srv.verify_commit(rev)
        assert proc.returncode == 0, (rev, proc.stderr)


def test_no_secret_anywhere_in_the_repo(world: World) -> None:
    srv = world.srv
    r = world.post(world.admin, "add-node", {"name": "secretcheck"})
    world.secrets.append(r.json()["sync_key"])
    history = srv.git("log", "-p", "--all", "--format=%H%n%B")
    for s in world.secrets:
        assert s not in history
    tok_part = srv.admin_token[len("mst_") + 13 :]  # the secret after the id
    assert tok_part not in history
    # Nor in any object at all (a blob that no commit references would not show in log -p).
    objects = subprocess.run(
        ["git", "-C", str(srv.data.repo), "cat-file", "--batch-all-objects", "--batch"],
        capture_output=True,
        env=srv.env,
        check=True,
    ).stdout
    for s in world.secrets:
        assert s.encode() not in objects
