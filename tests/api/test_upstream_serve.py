"""Two real `mailstate serve` processes sharing one bare upstream repo, driven over HTTP."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from mailstate.state.signing import allowed_signers_line, generate_key
from tests.helpers.admin import add_mailbox_edit
from tests.helpers.server import LiveServer, assert_error

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery"
WRITES = 200


def git(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True, env=env).stdout


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[LiveServer, LiveServer, Path, Path]]:
    """Servers A and B on one upstream, trusting each other and an admin key; sync every 0.3 s."""
    up = tmp_path / "upstream.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(up)], check=True)
    servers = [LiveServer(tmp_path / name) for name in ("a", "b")]
    for s in servers:
        s.cli("init", "--data", str(s.data.root), "--bcrypt-cost", "4")
    admin_key = tmp_path / "admin_key"
    trusted = "".join(s.data.allowed_signers.read_text() for s in servers)
    trusted += allowed_signers_line(generate_key(admin_key, "admin@example.org"), "admin@example.org")
    for s in servers:
        s.data.allowed_signers.write_text(trusted)
        s.admin_token = s.create_token(name="admin")
        s.env["MAILSTATE_SYNC_INTERVAL"] = "0.3"
        s.extra_args = ["--upstream", str(up)]
    try:
        for s in servers:
            s.start()  # A publishes its history; B (a fresh dir) validates and adopts it
        yield servers[0], servers[1], up, admin_key
    finally:
        for s in servers:
            s.stop()


def _wait_for(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_two_servers_200_concurrent_writes_nothing_lost(pair: tuple[LiveServer, LiveServer, Path, Path]) -> None:
    a, b, up, _ = pair
    assert a.git("rev-parse", "main") == b.git("rev-parse", "main")
    with a.client(a.admin_token) as c:
        assert (
            c.post("/v1/email-account/add-domain", json={"domain": "shared.example", "project_id": 5}).status_code
            == 201
        )
    _wait_for(lambda: b.git("rev-parse", "main") == a.git("rev-parse", "main"))
    before = int(git(up, "rev-list", "--count", "main"))
    tokens = {"a": a.create_token(project=5, name="proj-a"), "b": b.create_token(project=5, name="proj-b")}

    def write(i: int) -> tuple[int, int]:
        server, name = (a, "a") if i % 2 == 0 else (b, "b")
        with server.client(tokens[name]) as c:
            r = c.post("/v1/email-account/add-user", json={"email": f"u{i}@shared.example", "password": PASSWORD})
            return i, r.status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(write, range(WRITES)))
    assert [code for _, code in results] == [201] * WRITES
    commits = git(up, "rev-list", "main").split()
    assert len(commits) == before + WRITES
    subjects = git(up, "log", "--format=%s", f"-{WRITES}", "main").splitlines()
    assert sorted(subjects) == sorted(f"add-user u{i}@shared.example" for i in range(WRITES))  # no duplicates
    for server in (a, b):
        _wait_for(lambda s=server: s.git("rev-parse", "main") == git(up, "rev-parse", "main"))
        with server.client(server.admin_token) as c:
            users = {
                u["email"]
                for u in c.get("/v1/email-account/list-users", params={"domain": "shared.example"}).json()["users"]
            }
        assert users == {f"u{i}@shared.example" for i in range(WRITES)}
    # Every upstream commit is signed by a fleet key.
    for sha in commits[:20]:
        subprocess.run(
            ["git", "-C", str(up), "-c", f"gpg.ssh.allowedSignersFile={a.data.allowed_signers}", "verify-commit", sha],
            check=True,
            capture_output=True,
        )


def _admin_push(tmp: Path, up: Path, edit, key: Path | None) -> str:  # type: ignore[no-untyped-def]
    work = tmp / f"admin-{time.monotonic_ns()}"
    subprocess.run(["git", "clone", "-q", str(up), str(work)], check=True)
    edit(work)
    git(work, "add", "-A")
    base = ["-c", "user.name=Admin", "-c", "user.email=admin@example.org"]
    if key is not None:
        git(
            work,
            *base,
            "-c",
            "gpg.format=ssh",
            "-c",
            f"user.signingkey={key}",
            "commit",
            "-S",
            "-qm",
            "admin: hand edit",
        )
    else:
        git(work, *base, "commit", "-qm", "admin: unsigned hand edit")
    git(work, "push", "-q", "origin", "main")
    return git(work, "rev-parse", "HEAD").strip()


def test_admin_commits_are_served_or_refused(pair: tuple[LiveServer, LiveServer, Path, Path], tmp_path: Path) -> None:
    a, _b, up, admin_key = pair
    with a.client(a.admin_token) as c:
        assert (
            c.post("/v1/email-account/add-domain", json={"domain": "admin.example", "project_id": 9}).status_code == 201
        )

    # Signed by a trusted admin key: picked up and served by list-users.
    good = _admin_push(tmp_path, up, add_mailbox_edit("fromadmin"), admin_key)

    def listed() -> set[str]:
        with a.client(a.admin_token) as c:
            return {
                u["email"]
                for u in c.get("/v1/email-account/list-users", params={"domain": "admin.example"}).json()["users"]
            }

    _wait_for(lambda: "fromadmin@admin.example" in listed())
    assert a.git("rev-parse", "main").strip() == good

    # Unsigned: refused loudly in /v1/health; never served.
    bad = _admin_push(tmp_path, up, add_mailbox_edit("sneaky"), None)

    def health() -> dict[str, object]:
        # An admin token sees the refused commit; anonymous callers get the status only.
        return httpx.get(f"{a.url}/v1/health", headers={"Authorization": f"Bearer {a.admin_token}"}, timeout=5).json()  # type: ignore[no-any-return]

    _wait_for(lambda: health().get("status") == "degraded")
    refused = health()["refused_commit"]
    assert isinstance(refused, dict) and refused["commit"] == bad
    assert "not signed by a trusted key" in refused["problems"][0]
    assert "REFUSED upstream commit" in a.log_text()
    assert "sneaky@admin.example" not in listed()

    # A later API write still works, and puts a valid state back over the refused commit.
    with a.client(a.admin_token) as c:
        r = c.post("/v1/email-account/add-user", json={"email": "later@admin.example", "password": PASSWORD})
    assert r.status_code == 201, r.text
    assert git(up, "rev-parse", "main").strip() == r.json()["commit"]
    assert git(up, "rev-parse", "main^").strip() == good
    assert health()["status"] == "ok"


def test_unreachable_upstream_answers_503(pair: tuple[LiveServer, LiveServer, Path, Path], tmp_path: Path) -> None:
    a, _b, up, _ = pair
    head = a.git("rev-parse", "main").strip()
    up.rename(tmp_path / "gone.git")
    try:
        with a.client(a.admin_token) as c:
            r = c.post("/v1/email-account/add-domain", json={"domain": "later.example"})
        assert_error(r, 503, "upstream_unavailable")
        assert a.git("rev-parse", "main").strip() == head  # no local divergence
    finally:
        (tmp_path / "gone.git").rename(up)
