"""Node endpoints against a real server: reports (HTTP Basic name:sync_key, IP whitelist) and
the read-only git smart HTTP endpoint, exercised with real `git fetch`/`ls-remote`/`push`: it
serves only the accepted-head statement (refs/mailstate/accepted), never main. Plus the node
logic of state/nodes.py on its own. The refused-commit cases (fetch by sha over protocol v2)
are in test_refused_commits.py."""

from __future__ import annotations

import base64
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from mailstate.state.errors import Forbidden, InvalidInput, Unauthenticated
from mailstate.state.localdb import LocalDB
from mailstate.state.nodes import MAX_ERROR_CHARS, authenticate_node, normalize_addr, parse_report, record_report
from mailstate.state.store import Store
from tests.helpers.common import ADMIN
from tests.helpers.server import LiveServer, assert_error, live_server

API = "/v1/email-account"
REPORT = "/v1/nodes/report"


@dataclass
class Nodes:
    srv: LiveServer
    admin: httpx.Client
    key: str  # mpi02, no ip_address
    locked_key: str  # locked, ip_address 10.9.9.9

    def status(self, name: str) -> dict[str, object]:
        """The node's list-nodes entry without the fields that are ages (``*_age_s``, ``lag_s``):
        they grow with the clock, so two reads a second apart differ with nothing changed."""
        nodes = self.admin.get(f"{API}/list-nodes").json()["nodes"]
        entry = next(n for n in nodes if n["name"] == name)
        return {k: v for k, v in entry.items() if not (k.endswith("_age_s") or k == "lag_s")}

    def head(self) -> str:
        return self.srv.git("rev-parse", "main").strip()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    with live_server(tmp_path_factory.mktemp("nodes")) as srv, srv.client(srv.admin_token) as admin:
        key = admin.post(f"{API}/add-node", json={"name": "mpi02"}).json()["sync_key"]
        locked = admin.post(f"{API}/add-node", json={"name": "locked", "ip_address": "10.9.9.9"}).json()["sync_key"]
        yield Nodes(srv, admin, key, locked)


def basic(name: str, key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{key}".encode()).decode()}


# --- reports ---------------------------------------------------------------------------------


@pytest.mark.e2e
def test_report_is_recorded_and_listed(nodes: Nodes) -> None:
    srv = nodes.srv
    before = srv.commit_count()
    head = nodes.head()
    r = httpx.post(
        f"{srv.url}{REPORT}",
        json={"applied_commit": head, "status": "ok", "error": None},
        headers=basic("mpi02", nodes.key),
    )
    assert r.status_code == 200 and r.json() == {"ok": True}
    st = nodes.status("mpi02")
    assert st["applied_commit"] == head and st["status"] == "ok" and st["error"] is None
    assert st["commits_behind"] == 0
    assert datetime.fromisoformat(str(st["last_sync_at"])).tzinfo is not None
    # A report is not a commit; a later write puts the node one behind.
    assert srv.commit_count() == before
    assert nodes.admin.post(f"{API}/add-domain", json={"domain": "behind.example"}).status_code == 201
    assert nodes.status("mpi02")["commits_behind"] == 1


@pytest.mark.e2e
def test_report_with_credentials_in_the_body(nodes: Nodes) -> None:
    body = {"name": "mpi02", "sync_key": nodes.key, "applied_commit": None, "status": "error", "error": "fetch failed"}
    r = httpx.post(f"{nodes.srv.url}{REPORT}", json=body)
    assert r.status_code == 200
    st = nodes.status("mpi02")
    assert (st["status"], st["error"], st["applied_commit"], st["commits_behind"]) == (
        "error",
        "fetch failed",
        None,
        None,
    )


@pytest.mark.e2e
def test_report_like_pi_pull_sends_it(nodes: Nodes) -> None:
    """pi-pull sends Basic AND name/sync_key in the body."""
    head = nodes.head()
    body = {"applied_commit": head, "status": "refused", "error": "signature", "name": "mpi02", "sync_key": nodes.key}
    r = httpx.post(
        f"{nodes.srv.url}{REPORT}", json=body, headers={**basic("mpi02", nodes.key), "User-Agent": "pi-pull"}
    )
    assert r.status_code == 200
    assert nodes.status("mpi02")["status"] == "refused"


@pytest.mark.e2e
@pytest.mark.parametrize(
    "headers_body",
    [
        ({}, {"status": "ok"}),
        ("bad-key", {"status": "ok"}),
        ("unknown-node", {"status": "ok"}),
        ({"Authorization": "Basic !!!notbase64"}, {"status": "ok"}),
        ({"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}, {"status": "ok"}),
        ({}, {"name": "mpi02", "sync_key": "mss_wrong", "status": "ok"}),
        ({}, {"name": "mpi02", "status": "ok"}),
        ("mismatch", {"name": "locked", "status": "ok"}),
    ],
    ids=["none", "bad-key", "unknown-node", "bad-base64", "no-colon", "bad-body-key", "body-no-key", "name-mismatch"],
)
def test_report_401(nodes: Nodes, headers_body: tuple[object, dict[str, object]]) -> None:
    spec, body = headers_body
    headers = (
        {
            "bad-key": basic("mpi02", "mss_not-the-key"),
            "unknown-node": basic("ghost", nodes.key),
            "mismatch": basic("mpi02", nodes.key),
        }.get(spec, spec)
        if isinstance(spec, str)
        else spec
    )
    before = nodes.status("mpi02")
    r = httpx.post(f"{nodes.srv.url}{REPORT}", json=body, headers=headers)  # type: ignore[arg-type]
    assert_error(r, 401, "unauthenticated")
    assert r.headers["www-authenticate"].lower().startswith("basic")
    assert nodes.key not in r.text
    assert nodes.status("mpi02") == before


@pytest.mark.e2e
def test_report_from_an_address_off_the_whitelist_is_refused(nodes: Nodes) -> None:
    url = f"{nodes.srv.url}{REPORT}"
    r = httpx.post(url, json={"status": "ok"}, headers=basic("locked", nodes.locked_key))
    assert_error(r, 403, "ip_not_allowed")
    # X-Forwarded-For is not trusted (no proxy is configured).
    r = httpx.post(
        url, json={"status": "ok"}, headers={**basic("locked", nodes.locked_key), "X-Forwarded-For": "10.9.9.9"}
    )
    assert_error(r, 403, "ip_not_allowed")
    st = nodes.status("locked")
    assert st["last_sync_at"] is None and st["status"] == "never_synced"


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "great"}, "status"),
        ({}, "status"),
        ({"status": "ok", "applied_commit": "abc"}, "applied_commit"),
        ({"status": "ok", "applied_commit": "g" * 40}, "applied_commit"),
        ({"status": "ok", "applied_commit": 12}, "applied_commit"),
        ({"status": "ok", "extra": 1}, "extra"),
        ({"status": "ok", "error": ["x"]}, "error"),
        ({"status": "ok", "spam_filter": {"running": "yes"}}, "spam_filter"),
        ({"status": "ok", "spam_filter": {"running": True, "scanned": -1}}, "spam_filter"),
        ({"status": "ok", "spam_filter": {"running": True, "scanned": 2**60}}, "spam_filter"),
        ({"status": "ok", "spam_filter": {"running": True, "junked": "3"}}, "spam_filter"),
        ({"status": "ok", "spam_filter": {"running": True, "policy": "off"}}, "spam_filter"),
        ({"status": "ok", "spam_filter": [True]}, "spam_filter"),
        ({"status": "ok", "postscreen": {"dnsbl_rejected": -1}}, "postscreen"),
        ({"status": "ok", "postscreen": {"dnsbl_rejected": "4"}}, "postscreen"),
        ({"status": "ok", "postscreen": {"pregreet_rejected": 2**60}}, "postscreen"),
        ({"status": "ok", "postscreen": {"dnsbl_rejected": 1, "sites": ["x"]}}, "postscreen"),
        ({"status": "ok", "postscreen": {"error": "x" * 2001}}, "postscreen"),
    ],
)
def test_report_with_an_invalid_body_is_400(nodes: Nodes, body: dict[str, object], field: str) -> None:
    before = nodes.status("mpi02")
    err = assert_error(httpx.post(f"{nodes.srv.url}{REPORT}", json=body, headers=basic("mpi02", nodes.key)), 400)
    assert err.get("field") == field
    assert nodes.status("mpi02") == before


@pytest.mark.e2e
def test_report_malformed_json_is_400(nodes: Nodes) -> None:
    r = httpx.post(
        f"{nodes.srv.url}{REPORT}",
        content=b"{oops",
        headers={**basic("mpi02", nodes.key), "content-type": "application/json"},
    )
    assert_error(r, 400, "invalid_request")


@pytest.mark.e2e
def test_a_long_error_is_cut_not_refused(nodes: Nodes) -> None:
    r = httpx.post(
        f"{nodes.srv.url}{REPORT}", json={"status": "error", "error": "x" * 5000}, headers=basic("mpi02", nodes.key)
    )
    assert r.status_code == 200
    assert len(str(nodes.status("mpi02")["error"])) == MAX_ERROR_CHARS


@pytest.mark.e2e
def test_rotated_and_removed_keys_stop_working(nodes: Nodes) -> None:
    admin, url = nodes.admin, f"{nodes.srv.url}{REPORT}"
    old = admin.post(f"{API}/add-node", json={"name": "rotor"}).json()["sync_key"]
    assert httpx.post(url, json={"status": "ok"}, headers=basic("rotor", old)).status_code == 200
    new = admin.post(f"{API}/rotate-node-key", json={"name": "rotor"}).json()["sync_key"]
    assert_error(httpx.post(url, json={"status": "ok"}, headers=basic("rotor", old)), 401)
    assert httpx.post(url, json={"status": "ok"}, headers=basic("rotor", new)).status_code == 200
    assert admin.post(f"{API}/remove-node", json={"name": "rotor"}).status_code == 200
    assert_error(httpx.post(url, json={"status": "ok"}, headers=basic("rotor", new)), 401)


# --- git smart HTTP --------------------------------------------------------------------------


def git(
    srv: LiveServer, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full = {**srv.env, "GIT_TERMINAL_PROMPT": "0", **(env or {})}
    return subprocess.run(["git", *args], capture_output=True, text=True, env=full, cwd=cwd, timeout=60)


def header_env(name: str, key: str) -> dict[str, str]:
    """How pi-pull passes its key: an http.extraHeader from the environment, never argv or a URL."""
    token = base64.b64encode(f"{name}:{key}".encode()).decode()
    return {
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "http.extraHeader",
        "GIT_CONFIG_VALUE_0": f"Authorization: Basic {token}",
    }


STATEMENT = "refs/mailstate/accepted"


def node_repo(srv: LiveServer, path: Path) -> Path:
    """An empty bare repo, as a node's mirror starts."""
    assert git(srv, "init", "--quiet", "--bare", str(path)).returncode == 0
    return path


def stated_commit(srv: LiveServer, repo: Path) -> str:
    return git(srv, "-C", str(repo), "rev-parse", "refs/pi-pull/accepted^{commit}").stdout.strip()


def wait_stated(nodes: Nodes) -> str:
    """main, once the server's statement names it (the server writes it just after a write)."""
    head = nodes.head()
    deadline = time.monotonic() + 5
    while nodes.srv.git("rev-parse", f"{STATEMENT}^{{commit}}").strip() != head:
        assert time.monotonic() < deadline, "the statement did not follow main"
        time.sleep(0.05)
    return head


@pytest.mark.e2e
def test_git_fetch_with_the_key_in_the_url(nodes: Nodes, tmp_path: Path) -> None:
    srv = nodes.srv
    url = f"http://mpi02:{nodes.key}@127.0.0.1:{srv.port}/v1/nodes/state.git"
    repo = node_repo(srv, tmp_path / "n.git")
    proc = git(srv, "-C", str(repo), "fetch", "--quiet", url, f"+{STATEMENT}:refs/pi-pull/accepted")
    assert proc.returncode == 0, proc.stderr
    assert stated_commit(srv, repo) == wait_stated(nodes)
    assert git(srv, "-C", str(repo), "cat-file", "-e", f"{nodes.head()}:mailstate.yaml").returncode == 0


@pytest.mark.e2e
def test_git_fetch_the_way_the_node_does(nodes: Nodes, tmp_path: Path) -> None:
    srv = nodes.srv
    url = f"http://127.0.0.1:{srv.port}/v1/nodes/state.git"
    env = header_env("mpi02", nodes.key)
    repo = node_repo(srv, tmp_path / "n.git")
    assert nodes.admin.post(f"{API}/add-domain", json={"domain": "fetched.example"}).status_code == 201
    head = wait_stated(nodes)
    for protocol in ("2", "0"):  # a client asking for v2 gets v0 (see api.nodes_http)
        proc = git(
            srv,
            "-c",
            f"protocol.version={protocol}",
            "-C",
            str(repo),
            "fetch",
            "--quiet",
            url,
            f"+{STATEMENT}:refs/pi-pull/accepted",
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        assert stated_commit(srv, repo) == head
    # main is not served, under any name
    for ref in ("main", "refs/heads/main", "HEAD"):
        proc = git(srv, "-C", str(repo), "fetch", "--quiet", url, f"+{ref}:refs/x", env=env)
        assert proc.returncode != 0, ref


@pytest.mark.e2e
@pytest.mark.parametrize("who", ["no-key", "wrong-key", "unknown-node", "off-whitelist"])
def test_git_fetch_refused(nodes: Nodes, tmp_path: Path, who: str) -> None:
    srv = nodes.srv
    url = f"http://127.0.0.1:{srv.port}/v1/nodes/state.git"
    env = {
        "no-key": {},
        "wrong-key": header_env("mpi02", "mss_wrong"),
        "unknown-node": header_env("ghost", nodes.key),
        "off-whitelist": header_env("locked", nodes.locked_key),
    }[who]
    repo = node_repo(srv, tmp_path / "n.git")
    proc = git(srv, "-C", str(repo), "fetch", "--quiet", url, f"+{STATEMENT}:refs/pi-pull/accepted", env=env)
    assert proc.returncode != 0
    assert git(srv, "-C", str(repo), "rev-parse", "--verify", "--quiet", "refs/pi-pull/accepted").returncode != 0
    expected = "403" if who == "off-whitelist" else ("401", "Authentication failed", "could not read Username")
    assert any(e in proc.stderr for e in ((expected,) if isinstance(expected, str) else expected)), proc.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("protocol", ["0", "2"])
def test_only_the_statement_is_advertised(nodes: Nodes, protocol: str) -> None:
    srv = nodes.srv
    srv.git("update-ref", "refs/mailstate/rejected/" + nodes.head(), nodes.head())
    url = f"http://127.0.0.1:{srv.port}/v1/nodes/state.git"
    proc = git(srv, "-c", f"protocol.version={protocol}", "ls-remote", url, env=header_env("mpi02", nodes.key))
    assert proc.returncode == 0, proc.stderr
    refs = [line.split("\t")[1] for line in proc.stdout.splitlines()]
    assert refs == [STATEMENT, STATEMENT + "^{}"]


@pytest.mark.e2e
def test_git_push_is_refused(nodes: Nodes, tmp_path: Path) -> None:
    srv = nodes.srv
    url = f"http://127.0.0.1:{srv.port}/v1/nodes/state.git"
    env = header_env("mpi02", nodes.key)
    work = tmp_path / "c"
    assert git(srv, "init", "--quiet", "-b", "main", str(work)).returncode == 0
    before = nodes.head()
    git(
        srv,
        "-C",
        str(work),
        "-c",
        "user.name=x",
        "-c",
        "user.email=x@x",
        "commit",
        "--quiet",
        "--allow-empty",
        "-m",
        "evil",
    )
    for ref in ("HEAD:main", f"HEAD:{STATEMENT}"):
        proc = git(srv, "-C", str(work), "push", url, ref, env=env)
        assert proc.returncode != 0 and "403" in proc.stderr, proc.stderr
    assert nodes.head() == before


@pytest.mark.e2e
def test_git_endpoint_serves_only_upload_pack(nodes: Nodes) -> None:
    base = f"{nodes.srv.url}/v1/nodes/state.git"
    auth = basic("mpi02", nodes.key)
    assert_error(httpx.get(f"{base}/info/refs", params={"service": "git-receive-pack"}, headers=auth), 403, "read_only")
    assert_error(httpx.post(f"{base}/git-receive-pack", content=b"0000", headers=auth), 403, "read_only")
    assert_error(httpx.get(f"{base}/info/refs", headers=auth), 404)  # the dumb protocol
    assert_error(httpx.get(f"{base}/HEAD", headers=auth), 404)
    assert_error(httpx.get(f"{base}/objects/info/packs", headers=auth), 404)
    assert_error(httpx.get(f"{base}/../mailstate.db", headers=auth), 404)
    assert_error(httpx.get(f"{base}/git-upload-pack", headers=auth), 404)
    r = httpx.get(f"{base}/info/refs", params={"service": "git-upload-pack"}, headers=auth)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-git-upload-pack-advertisement"
    assert_error(httpx.get(f"{base}/info/refs", params={"service": "git-upload-pack"}), 401)


# --- state/nodes.py on its own ------------------------------------------------------------------


@pytest.fixture
def node_store(store: Store) -> tuple[Store, str, str]:
    free = store.execute("add-node", ADMIN, {"name": "free"}).result["sync_key"]
    pinned = store.execute("add-node", ADMIN, {"name": "pinned", "ip_address": "10.9.9.9"}).result["sync_key"]
    return store, free, pinned


def test_authenticate_node(node_store: tuple[Store, str, str]) -> None:
    store, free, pinned = node_store
    snap = store.snapshot
    assert authenticate_node(snap, "free", free, "203.0.113.5").ip_address is None
    assert authenticate_node(snap, "free", free, None).ip_address is None
    assert authenticate_node(snap, "pinned", pinned, "10.9.9.9").ip_address == "10.9.9.9"
    assert authenticate_node(snap, "pinned", pinned, "::ffff:10.9.9.9").ip_address == "10.9.9.9"
    for name, key in [("free", pinned), ("free", ""), ("ghost", free), ("free", free + "x"), ("free", "k" * 10_000)]:
        with pytest.raises(Unauthenticated):
            authenticate_node(snap, name, key, "10.9.9.9")
    for bad in (None, 42, ["free"]):
        with pytest.raises(Unauthenticated):
            authenticate_node(snap, bad, free, None)
        with pytest.raises(Unauthenticated):
            authenticate_node(snap, "free", bad, None)
    for addr in ("10.9.9.8", "127.0.0.1", "::1", None, "", "not-an-ip"):
        with pytest.raises(Forbidden) as exc:
            authenticate_node(snap, "pinned", pinned, addr)
        assert exc.value.code == "ip_not_allowed"
        assert pinned not in exc.value.message


def test_authenticate_ipv6_node(store: Store) -> None:
    key = store.execute("add-node", ADMIN, {"name": "six", "ip_address": "2001:DB8:0:0::1"}).result["sync_key"]
    assert authenticate_node(store.snapshot, "six", key, "2001:db8::1")
    with pytest.raises(Forbidden):
        authenticate_node(store.snapshot, "six", key, "2001:db8::2")


def test_normalize_addr() -> None:
    assert str(normalize_addr("::ffff:192.0.2.1")) == "192.0.2.1"
    assert str(normalize_addr("fe80::1%eth0")) == "fe80::1"
    assert normalize_addr("garbage") is None and normalize_addr(None) is None


def test_record_report_and_parse(node_store: tuple[Store, str, str], data_dir) -> None:  # type: ignore[no-untyped-def]
    store, _free, _pinned = node_store
    db = LocalDB(data_dir.db)
    try:
        now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
        head = store.head
        report = record_report(
            db, store.snapshot, "free", {"applied_commit": head.upper(), "status": "ok"}, "::ffff:10.0.0.1", now
        )
        assert report.applied_commit == head
        assert db.node_status("free") == {
            "last_sync_at": now.isoformat(), "applied_commit": head, "status": "ok", "error": None,
            "statement_issued_at": None, "last_error": None, "last_error_at": None, "replication": [],
            "spam_filter": None, "postscreen": None,
        }  # fmt: skip
        # the inbound filter's state rides on the report; list-nodes and /metrics read it back
        spam = {"running": True, "scanned": 12, "rejected": 2, "junked": 3}
        record_report(db, store.snapshot, "free", {"status": "ok", "spam_filter": spam}, "10.0.0.1", now)
        assert db.node_status("free")["spam_filter"] == {**spam, "error": None}  # type: ignore[index]
        down = {"running": False, "error": "rspamd does not answer on 127.0.0.1:11334"}
        record_report(db, store.snapshot, "free", {"status": "ok", "spam_filter": down}, "10.0.0.1", now)
        assert db.node_status("free")["spam_filter"] == {  # type: ignore[index]
            "running": False, "scanned": None, "rejected": None, "junked": None, "error": down["error"],
        }  # fmt: skip
        # so do postscreen's refusals; a report without them leaves none
        screened = {"dnsbl_rejected": 7, "pregreet_rejected": 1, "error": None}
        record_report(db, store.snapshot, "free", {"status": "ok", "postscreen": screened}, "10.0.0.1", now)
        assert db.node_status("free")["postscreen"] == screened  # type: ignore[index]
        record_report(db, store.snapshot, "free", {"status": "ok"}, "10.0.0.1", now)
        assert db.node_status("free")["postscreen"] is None  # type: ignore[index]
        with pytest.raises(Unauthenticated):
            record_report(db, store.snapshot, "ghost", {"status": "ok"}, None, now)
        for body in ([], "x", None, {"status": "ok", "name": "free"}, {"status": "unknown"}):
            with pytest.raises(InvalidInput):
                parse_report(body)
        assert parse_report({"status": "error", "error": "e" * 3000}).error == "e" * (MAX_ERROR_CHARS - 3) + "..."
    finally:
        db.close()
