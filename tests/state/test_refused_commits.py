"""A commit the server refused never reaches a node; the correction does, and nodes can follow it.

The server states its accepted head in a signed tag at refs/mailstate/accepted
(state/statement.py). These tests push commits signed by a TRUSTED admin key but with a
hand-edited rendered passwd line (a `{PLAIN}` password with `nopassword=y`), which the server
refuses, and check what a node can get:

* library level, local mode and upstream mode (a bare repo as the git host): the statement
  never names the refused commit, only moves forward, and moves to the correction, which
  descends from the last accepted commit; list-nodes tells "diverged" from "behind";
* server level: real `mailstate serve`, real `git fetch` over the node endpoint with a node's
  sync key. Only the statement is advertised; main and the refused commit cannot be fetched,
  not even by sha over protocol v2; the background thread notices the bad push with no request.

Real git, real SSH signatures (ssh-keygen keys), real HTTP; no mocks.
"""

from __future__ import annotations

import base64
import itertools
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pygit2
import pytest

from mailstate.state.datadir import DataDir, init_data_dir, open_store
from mailstate.state.localdb import LocalDB
from mailstate.state.models import Settings
from mailstate.state.signing import SshKeygenSigner
from mailstate.state.statement import REF, Statement, read_statement, verify_statement, write_statement
from mailstate.state.store import Store
from mailstate.state.upstream import REJECTED_PREFIX
from tests.helpers.admin import BAD_LINE, admin_push, plain_password_line, run, trust_admin
from tests.helpers.common import ADMIN, PASSWORD, PROJECT_A, FakeClock, git_out
from tests.helpers.server import LiveServer

pytestmark = pytest.mark.e2e

API = "/v1/email-account"


# --- helpers ------------------------------------------------------------------------------------


def quota_bump(work: Path) -> None:
    """A valid admin change: raise a quota in the YAML, then recompile rendered/."""
    from mailstate.api.cli import main

    path = next(work.glob("domains/*/example.com.yaml"))
    path.write_text(path.read_text().replace("quota_mb: 1024", "quota_mb: 2048", 1))
    assert main(["compile", str(work)]) == 0


def statement_at(repo: Path, allowed: Path, ref: str = REF) -> tuple[str, Statement]:
    """(tag id, verified statement) at `ref` in `repo`; fails the test when absent or unsigned."""
    found = read_statement(pygit2.Repository(str(repo)), ref)
    assert found is not None, f"no statement at {ref} in {repo}"
    return found[0], verify_statement(found[1], allowed)


def parent(repo: Path, commit: str) -> str:
    return run(repo, "rev-parse", f"{commit}^").stdout.strip()


def has_object(repo: Path, sha: str) -> bool:
    return run(repo, "cat-file", "-e", sha, check=False).returncode == 0


def wait_for(predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def setup_domain(store: Store) -> None:
    store.execute("link-domain", ADMIN, {"domain": "example.com", "project_id": PROJECT_A.project_id})
    store.execute("enable-email", PROJECT_A, {"domain": "example.com"})
    store.execute("add-user", PROJECT_A, {"email": "info@example.com", "password": PASSWORD})


def users(store: Store) -> set[str]:
    return {u["email"] for u in store.execute("list-users", PROJECT_A).result["users"]}


# --- local mode, library level --------------------------------------------------------------------


def test_every_write_moves_the_statement_to_its_commit(store: Store, data_dir: DataDir) -> None:
    tag0, st = statement_at(data_dir.repo, data_dir.allowed_signers)
    assert st.head == store.head  # opening the store stated the initial commit
    setup_domain(store)
    _tag, st = statement_at(data_dir.repo, data_dir.allowed_signers)
    assert st.head == store.head == git_out(data_dir.repo, "rev-parse", "main").strip()
    assert store.health()["statement"] == {"head": store.head, "issued_at": st.issued_at, "error": None}
    # A no-op writes no statement.
    tag, _ = statement_at(data_dir.repo, data_dir.allowed_signers)
    assert store.execute("enable-email", PROJECT_A, {"domain": "example.com"}).result["commit"] is None
    assert statement_at(data_dir.repo, data_dir.allowed_signers)[0] == tag != tag0


def test_a_trusted_but_invalid_commit_is_never_stated_and_the_correction_is(data_dir: DataDir, tmp_path: Path) -> None:
    key = trust_admin(data_dir.allowed_signers, tmp_path)
    x = open_store(data_dir.root)
    setup_domain(x)
    good = x.head
    bad = admin_push(data_dir.repo, tmp_path, key, plain_password_line)
    assert x.watch()  # what the server's background thread does every second
    health = x.health()
    assert health["status"] == "degraded" and health["refused_commit"]["commit"] == bad
    assert statement_at(data_dir.repo, data_dir.allowed_signers)[1].head == good
    # Another process opening the data dir starts from the statement and refuses the same commit.
    y = open_store(data_dir.root)
    assert y.head == good and y.health()["refused_commit"]["commit"] == bad
    assert statement_at(data_dir.repo, data_dir.allowed_signers)[1].head == good

    out = x.execute("add-user", PROJECT_A, {"email": "after@example.com", "password": PASSWORD})
    fix = out.result["commit"]
    assert git_out(data_dir.repo, "rev-parse", "main").strip() == fix
    assert parent(data_dir.repo, fix) == good  # the correction descends from the last accepted commit
    assert statement_at(data_dir.repo, data_dir.allowed_signers)[1].head == fix
    assert git_out(data_dir.repo, "rev-parse", REJECTED_PREFIX + bad).strip() == bad
    assert x.health()["status"] == "ok"
    assert BAD_LINE.split(":")[0] not in users(y)


def test_a_restarted_store_validates_main_against_the_statement(data_dir: DataDir, tmp_path: Path) -> None:
    """A commit pushed while no server ran is checked like any other, not served as it is."""
    key = trust_admin(data_dir.allowed_signers, tmp_path)
    x = open_store(data_dir.root)
    setup_domain(x)
    good = x.head
    del x
    ok = admin_push(data_dir.repo, tmp_path, key, quota_bump)
    y = open_store(data_dir.root)
    assert y.head == ok and statement_at(data_dir.repo, data_dir.allowed_signers)[1].head == ok
    del y
    bad = admin_push(data_dir.repo, tmp_path, key, plain_password_line)
    z = open_store(data_dir.root)
    assert z.head == ok != good
    assert z.health()["refused_commit"]["commit"] == bad
    assert statement_at(data_dir.repo, data_dir.allowed_signers)[1].head == ok


def test_the_statement_only_moves_forward(data_dir: DataDir) -> None:
    x = open_store(data_dir.root)
    setup_domain(x)
    y = open_store(data_dir.root)
    y.execute("add-user", PROJECT_A, {"email": "y@example.com", "password": PASSWORD})
    newer = y.head
    assert x.head != newer  # x has not looked yet
    x.refresh_statement()  # x's head is an ancestor of the statement's: it must stay
    assert statement_at(data_dir.repo, data_dir.allowed_signers)[1].head == newer
    assert x.watch() and x.head == newer
    before = statement_at(data_dir.repo, data_dir.allowed_signers)[1]
    assert x.refresh_statement()
    after = statement_at(data_dir.repo, data_dir.allowed_signers)[1]
    assert after.head == newer and after.issued_at >= before.issued_at


def test_a_statement_no_server_signed_is_replaced(data_dir: DataDir, tmp_path: Path) -> None:
    key = trust_admin(data_dir.allowed_signers, tmp_path)
    x = open_store(data_dir.root)
    setup_domain(x)
    good = x.head
    bad = admin_push(data_dir.repo, tmp_path, key, plain_password_line)
    # The admin also "states" the bad commit; nodes would refuse it, and so does the store.
    write_statement(data_dir.repo, SshKeygenSigner(key), bad)
    out = x.execute("add-user", PROJECT_A, {"email": "after@example.com", "password": PASSWORD})
    st = statement_at(data_dir.repo, data_dir.allowed_signers)[1]
    assert st.head == out.result["commit"] and parent(data_dir.repo, st.head) == good
    # A ref that is not a tag at all is replaced too.
    repo = pygit2.Repository(str(data_dir.repo))
    repo.references.create(REF, repo.references["refs/heads/main"].target, force=True)
    assert x.refresh_statement()
    assert statement_at(data_dir.repo, data_dir.allowed_signers)[1].head == x.head


def test_the_background_thread_notices_pushes_without_requests(data_dir: DataDir, tmp_path: Path) -> None:
    key = trust_admin(data_dir.allowed_signers, tmp_path)
    x = open_store(data_dir.root)
    setup_domain(x)
    stop = threading.Event()
    thread = threading.Thread(
        target=x.run_background, args=(stop,), kwargs={"statement_interval": 0.3, "watch_interval": 0.1}, daemon=True
    )
    thread.start()
    try:
        first = statement_at(data_dir.repo, data_dir.allowed_signers)[1]
        wait_for(
            lambda: statement_at(data_dir.repo, data_dir.allowed_signers)[1].issued_at > first.issued_at,
            what="a refreshed statement",
        )
        ok = admin_push(data_dir.repo, tmp_path, key, quota_bump)
        wait_for(
            lambda: statement_at(data_dir.repo, data_dir.allowed_signers)[1].head == ok,
            2.5,
            "the good admin commit's statement",
        )
        # With the thread running, a write leaves its statement to it (off the write path).
        mine = x.execute("add-user", PROJECT_A, {"email": "bg@example.com", "password": PASSWORD}).result["commit"]
        wait_for(
            lambda: statement_at(data_dir.repo, data_dir.allowed_signers)[1].head == mine, 2.5, "the write's statement"
        )
        ok = mine
        bad = admin_push(data_dir.repo, tmp_path, key, plain_password_line)
        wait_for(lambda: x.health()["status"] == "degraded", 2.5, "health to show the refused commit")
        assert x.health()["refused_commit"]["commit"] == bad
        time.sleep(0.5)  # a refresh or two later, still the good commit
        assert statement_at(data_dir.repo, data_dir.allowed_signers)[1].head == ok
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()


def test_list_nodes_tells_diverged_from_behind(data_dir: DataDir, tmp_path: Path) -> None:
    key = trust_admin(data_dir.allowed_signers, tmp_path)
    db = LocalDB(data_dir.db)
    try:
        x = open_store(data_dir.root, db=db)
        setup_domain(x)
        x.execute("add-node", ADMIN, {"name": "n1"})
        older = x.head
        x.execute("add-user", PROJECT_A, {"email": "two@example.com", "password": PASSWORD})
        good = x.head
        bad = admin_push(data_dir.repo, tmp_path, key, plain_password_line)
        x.watch()
        x.execute("add-user", PROJECT_A, {"email": "three@example.com", "password": PASSWORD})  # the correction

        def node(applied: str | None) -> dict[str, object]:
            db.record_node_status(
                "n1", applied_commit=applied, status="ok", error=None, remote_addr=None, at=datetime.now(UTC)
            )
            entry: dict[str, object] = x.execute("list-nodes", ADMIN).result["nodes"][0]
            return entry

        assert {k: node(older)[k] for k in ("diverged", "commits_behind")} == {"diverged": False, "commits_behind": 2}
        assert {k: node(good)[k] for k in ("diverged", "commits_behind")} == {"diverged": False, "commits_behind": 1}
        assert {k: node(x.head)[k] for k in ("diverged", "commits_behind")} == {"diverged": False, "commits_behind": 0}
        assert {k: node(bad)[k] for k in ("diverged", "commits_behind")} == {"diverged": True, "commits_behind": None}
        assert {k: node("ab" * 20)[k] for k in ("diverged", "commits_behind")} == {
            "diverged": True,
            "commits_behind": None,
        }
        assert {k: node(None)[k] for k in ("diverged", "commits_behind")} == {"diverged": False, "commits_behind": None}
    finally:
        db.close()


# --- upstream mode, library level ----------------------------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path) -> dict[str, Path | DataDir]:
    """A bare upstream (the git host), two server data dirs trusting each other, an admin key."""
    up = tmp_path / "upstream.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(up)], check=True)
    a = init_data_dir(tmp_path / "a", Settings(bcrypt_cost=4), clock=FakeClock())
    b = init_data_dir(tmp_path / "b", Settings(bcrypt_cost=4), clock=FakeClock())
    key = trust_admin(a.allowed_signers, tmp_path)
    trusted = a.allowed_signers.read_text() + b.allowed_signers.read_text()
    for dd in (a, b):
        dd.allowed_signers.write_text(trusted)
    return {"up": up, "a": a, "b": b, "key": key, "tmp": tmp_path}


def _dd(fleet: dict[str, Path | DataDir], name: str) -> DataDir:
    dd = fleet[name]
    assert isinstance(dd, DataDir)
    return dd


def _path(fleet: dict[str, Path | DataDir], name: str) -> Path:
    p = fleet[name]
    assert isinstance(p, Path)
    return p


def follow_host(up: Path, node: Path) -> str:
    """What a node following the git host does: fetch only the statement; the commit it names."""
    if not node.exists():
        subprocess.run(["git", "init", "-q", "--bare", str(node)], check=True)
    run(node, "fetch", "-q", "--no-tags", str(up), f"+{REF}:refs/pi-pull/accepted")
    return run(node, "rev-parse", "refs/pi-pull/accepted^{commit}").stdout.strip()


def test_upstream_refused_commit_is_never_stated_and_the_correction_is(fleet: dict[str, Path | DataDir]) -> None:
    up, tmp, a_dd = _path(fleet, "up"), _path(fleet, "tmp"), _dd(fleet, "a")
    a = open_store(a_dd.root, upstream=str(up))
    setup_domain(a)
    good = a.head
    assert statement_at(up, a_dd.allowed_signers)[1].head == good == run(up, "rev-parse", "main").stdout.strip()
    node = tmp / "node.git"
    assert follow_host(up, node) == good

    bad = admin_push(up, tmp, _path(fleet, "key"), plain_password_line)
    assert a.sync() is not None and a.health()["refused_commit"]["commit"] == bad
    a.refresh_statement()
    assert statement_at(up, a_dd.allowed_signers)[1].head == good
    assert follow_host(up, node) == good and not has_object(node, bad)  # never even downloaded

    fix = a.execute("add-user", PROJECT_A, {"email": "after@example.com", "password": PASSWORD}).result["commit"]
    assert run(up, "rev-parse", "main").stdout.strip() == fix and parent(up, fix) == good
    assert statement_at(up, a_dd.allowed_signers)[1].head == fix
    assert follow_host(up, node) == fix and not has_object(node, bad)
    assert run(node, "merge-base", "--is-ancestor", good, fix, check=False).returncode == 0  # the node moves forward


def test_a_failed_statement_push_does_not_fail_the_write(fleet: dict[str, Path | DataDir]) -> None:
    up, a_dd = _path(fleet, "up"), _dd(fleet, "a")
    a = open_store(a_dd.root, upstream=str(up))
    setup_domain(a)
    hook = up / "hooks" / "update"
    hook.write_text(
        '#!/bin/sh\ncase "$1" in refs/mailstate/*) echo "statements refused here" >&2; exit 1;; esac\nexit 0\n'
    )
    hook.chmod(0o755)
    out = a.execute("add-user", PROJECT_A, {"email": "kept@example.com", "password": PASSWORD})
    assert run(up, "rev-parse", "main").stdout.strip() == out.result["commit"]  # the write landed
    health = a.health()
    assert health["status"] == "degraded" and "statement" in (health["statement"]["error"] or "")
    assert statement_at(up, a_dd.allowed_signers)[1].head != out.result["commit"]
    hook.unlink()
    a.refresh_statement()  # what the schedule does
    assert statement_at(up, a_dd.allowed_signers)[1].head == out.result["commit"]
    assert a.health()["status"] == "ok"


def test_a_stale_server_never_moves_the_upstream_statement_back(fleet: dict[str, Path | DataDir]) -> None:
    up, a_dd, b_dd = _path(fleet, "up"), _dd(fleet, "a"), _dd(fleet, "b")
    a = open_store(a_dd.root, upstream=str(up))
    setup_domain(a)
    b = open_store(b_dd.root, upstream=str(up))
    assert b.head == a.head
    a.execute("add-user", PROJECT_A, {"email": "newer@example.com", "password": PASSWORD})
    newer = a.head
    b.refresh_statement()  # b has not fetched yet: its head is older
    assert statement_at(up, b_dd.allowed_signers)[1].head == newer
    b.sync()
    assert b.head == newer
    b.refresh_statement()
    tag, st = statement_at(up, b_dd.allowed_signers)
    assert st.head == newer and tag == statement_at(b_dd.repo, b_dd.allowed_signers)[0]  # b's own, for the same head


# --- server level: the node endpoint of a real `mailstate serve` -----------------------------------


def _basic_env(name: str, key: str) -> dict[str, str]:
    token = base64.b64encode(f"{name}:{key}".encode()).decode()
    return {
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "http.extraHeader",
        "GIT_CONFIG_VALUE_0": f"Authorization: Basic {token}",
        "GIT_TERMINAL_PROMPT": "0",
    }


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[LiveServer, str]]:
    """A real server (statement refreshed every 0.5 s) with example.com, one mailbox, node n1."""
    srv = LiveServer(tmp_path)
    srv.env["MAILSTATE_STATEMENT_INTERVAL"] = "0.5"
    srv.start()
    try:
        with srv.client(srv.admin_token) as admin:
            project = srv.create_token(project=PROJECT_A.project_id)
            assert admin.post(
                f"{API}/link-domain", json={"domain": "example.com", "project_id": PROJECT_A.project_id}
            ).status_code in (200, 201)
            with srv.client(project) as p:
                assert p.post(f"{API}/enable-email", json={"domain": "example.com"}).status_code in (200, 201)
                assert (
                    p.post(f"{API}/add-user", json={"email": "info@example.com", "password": PASSWORD}).status_code
                    == 201
                )
            key = admin.post(f"{API}/add-node", json={"name": "n1"}).json()["sync_key"]
        srv.project_token = project  # type: ignore[attr-defined]
        yield srv, key
    finally:
        srv.stop()


def test_the_node_endpoint_serves_only_what_the_server_accepted(served: tuple[LiveServer, str], tmp_path: Path) -> None:
    srv, key = served
    url = f"{srv.url}/v1/nodes/state.git"
    env = {**srv.env, **_basic_env("n1", key)}
    node = tmp_path / "node.git"
    subprocess.run(["git", "init", "-q", "--bare", str(node)], check=True)

    for version in ("0", "2"):
        refs = run(node, "-c", f"protocol.version={version}", "ls-remote", url, env=env).stdout.split()
        assert refs[1::2] == [REF, REF + "^{}"], refs  # no HEAD, no main, no private refs
    good = srv.git("rev-parse", "main").strip()
    wait_for(
        lambda: statement_at(srv.data.repo, srv.data.allowed_signers)[1].head == good, 4.0, "the last write's statement"
    )
    run(node, "fetch", "-q", url, f"+{REF}:refs/pi-pull/accepted", env=env)
    assert run(node, "rev-parse", "refs/pi-pull/accepted^{commit}").stdout.strip() == good
    assert run(node, "fetch", "-q", url, "+refs/heads/main:refs/x", env=env, check=False).returncode != 0

    admin_key = trust_admin(srv.data.allowed_signers, tmp_path)
    bad = admin_push(srv.data.repo, tmp_path, admin_key, plain_password_line, env=srv.env)
    assert srv.verify_commit(bad).returncode == 0  # trusted-signed all the same

    # The background thread refuses it within about a second, with no request to the store.
    def health() -> dict[str, object]:
        body: dict[str, object] = httpx.get(
            f"{srv.url}/v1/health", headers={"Authorization": f"Bearer {srv.admin_token}"}
        ).json()
        return body

    wait_for(lambda: health()["status"] == "degraded", 4.0, "health to show the refused commit")
    st = statement_at(srv.data.repo, srv.data.allowed_signers)[1]
    assert st.head == good

    for version in ("2", "0"):
        proc = run(node, "-c", f"protocol.version={version}", "fetch", "-q", url, bad, env=env, check=False)
        assert proc.returncode != 0, f"refused commit fetched by sha over protocol v{version}"
        assert not has_object(node, bad)
    assert run(node, "fetch", "-q", url, "+refs/heads/main:refs/x", env=env, check=False).returncode != 0
    run(node, "fetch", "-q", url, f"+{REF}:refs/pi-pull/accepted", env=env)
    assert run(node, "rev-parse", "refs/pi-pull/accepted^{commit}").stdout.strip() == good and not has_object(node, bad)

    # The next API write is the correction: it descends from the last accepted commit.
    with srv.client(srv.project_token) as p:  # type: ignore[attr-defined]
        fix = p.post(f"{API}/add-user", json={"email": "after@example.com", "password": PASSWORD}).json()["commit"]
    assert parent(srv.data.repo, fix) == good
    wait_for(
        lambda: statement_at(srv.data.repo, srv.data.allowed_signers)[1].head == fix, 4.0, "the correction's statement"
    )
    run(node, "fetch", "-q", url, f"+{REF}:refs/pi-pull/accepted", env=env)
    assert run(node, "rev-parse", "refs/pi-pull/accepted^{commit}").stdout.strip() == fix
    assert run(node, "merge-base", "--is-ancestor", good, "refs/pi-pull/accepted^{commit}", check=False).returncode == 0
    assert run(node, "-c", "protocol.version=2", "fetch", "-q", url, bad, env=env, check=False).returncode != 0
    assert not has_object(node, bad)
    wait_for(lambda: health()["status"] == "ok", 4.0, "health back to ok")


def test_the_server_refreshes_the_statement_on_its_own(served: tuple[LiveServer, str]) -> None:
    srv, _key = served
    head = srv.git("rev-parse", "main").strip()
    wait_for(
        lambda: statement_at(srv.data.repo, srv.data.allowed_signers)[1].head == head, 4.0, "the last write's statement"
    )
    first = statement_at(srv.data.repo, srv.data.allowed_signers)[1]
    wait_for(
        lambda: statement_at(srv.data.repo, srv.data.allowed_signers)[1].issued_at > first.issued_at,
        5.0,
        "a refreshed statement",
    )


def test_a_good_commit_by_another_process_is_stated_promptly(served: tuple[LiveServer, str], tmp_path: Path) -> None:
    """A commit the server did not make (an admin's, trusted and valid) gets its statement from
    the server's background thread, with no request."""
    srv, _key = served
    admin_key = trust_admin(srv.data.allowed_signers, tmp_path)
    ok = admin_push(srv.data.repo, tmp_path, admin_key, quota_bump, env=srv.env)
    wait_for(
        lambda: statement_at(srv.data.repo, srv.data.allowed_signers)[1].head == ok, 4.0, "the admin commit's statement"
    )
    body = httpx.get(f"{srv.url}/v1/health", headers={"Authorization": f"Bearer {srv.admin_token}"}).json()
    assert body["status"] == "ok" and body["head"] == ok


def test_two_writers_upstream_statement_names_only_main_and_moves_forward(fleet: dict[str, Path | DataDir]) -> None:
    """Every update of upstream's statement (logged by a reference-transaction hook) names a commit on
    upstream main, and each names a descendant of the one before: a rejected push never
    carries its statement up, and a stale server never moves it back."""
    up, a_dd, b_dd = _path(fleet, "up"), _dd(fleet, "a"), _dd(fleet, "b")
    a = open_store(a_dd.root, upstream=str(up))
    setup_domain(a)
    b = open_store(b_dd.root, upstream=str(up))
    log = up / "updates.log"
    hook = up / "hooks" / "reference-transaction"  # sees only updates that really happen
    hook.write_text(
        f'#!/bin/sh\n[ "$1" = committed ] || exit 0\nwhile read old new ref; do echo "$ref $new" >> {log}; done\n'
    )
    hook.chmod(0o755)
    errors: list[BaseException] = []

    def work(store: Store, prefix: str) -> None:
        try:
            for i in range(4):
                store.execute("add-user", PROJECT_A, {"email": f"{prefix}{i}@example.com", "password": PASSWORD})
                store.refresh_statement()  # what the schedule does, racing the other writer
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s, p)) for s, p in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    main = run(up, "rev-parse", "main").stdout.strip()
    stated = [new for ref, new in (line.split() for line in log.read_text().splitlines()) if ref == REF]
    heads = [run(up, "rev-parse", f"{tag}^{{commit}}").stdout.strip() for tag in stated]
    assert heads, "no statement was pushed"
    for older, newer in itertools.pairwise(heads):
        assert run(up, "merge-base", "--is-ancestor", older, newer, check=False).returncode == 0, (older, newer)
    assert all(run(up, "merge-base", "--is-ancestor", h, main, check=False).returncode == 0 for h in heads)
    a.sync()
    a.refresh_statement()
    assert statement_at(up, a_dd.allowed_signers)[1].head == main
