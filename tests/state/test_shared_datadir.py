"""Several writers on ONE data dir (a running server plus `mailstate call` or `mailstate mcp`).

Each Store below stands for one process: its own snapshot and its own in-process lock. They
share only what processes share, the bare repo on disk. The last test runs the real CLI.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pygit2
import pytest

from mailstate.state.datadir import DataDir, open_store
from mailstate.state.statement import read_statement, verify_statement
from mailstate.state.store import Store
from tests.helpers.common import ADMIN, PASSWORD, PROJECT_A, commit_count, git_out

pytestmark = pytest.mark.e2e


def _users(store: Store) -> set[str]:
    return {u["email"] for u in store.execute("list-users", PROJECT_A).result["users"]}


def _setup(data_dir: DataDir) -> tuple[Store, Store]:
    x = open_store(data_dir.root)
    x.execute("link-domain", ADMIN, {"domain": "example.com", "project_id": PROJECT_A.project_id})
    x.execute("enable-email", PROJECT_A, {"domain": "example.com"})
    y = open_store(data_dir.root)
    return x, y


def test_a_read_sees_what_another_process_wrote(data_dir: DataDir) -> None:
    x, y = _setup(data_dir)
    x.execute("add-user", PROJECT_A, {"email": "one@example.com", "password": PASSWORD})
    assert _users(y) == {"one@example.com"}
    assert y.head == x.head


def test_a_write_on_a_stale_snapshot_is_rerun_not_lost(data_dir: DataDir) -> None:
    x, y = _setup(data_dir)
    before = commit_count(data_dir.repo)
    x.execute("add-user", PROJECT_A, {"email": "one@example.com", "password": PASSWORD})
    out = y.execute("add-user", PROJECT_A, {"email": "two@example.com", "password": PASSWORD})
    assert commit_count(data_dir.repo) == before + 2
    assert git_out(data_dir.repo, "rev-parse", "main^").strip() == x.head
    assert out.result["commit"] == git_out(data_dir.repo, "rev-parse", "main").strip()
    assert _users(x) == _users(y) == {"one@example.com", "two@example.com"}


def test_concurrent_writers_on_one_data_dir_lose_nothing(data_dir: DataDir) -> None:
    x, y = _setup(data_dir)
    before = commit_count(data_dir.repo)
    errors: list[BaseException] = []

    def work(store: Store, prefix: str) -> None:
        try:
            for i in range(15):
                store.execute("add-user", PROJECT_A, {"email": f"{prefix}{i}@example.com", "password": PASSWORD})
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s, p)) for s, p in ((x, "x"), (y, "y"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert commit_count(data_dir.repo) == before + 30
    assert _users(x) == _users(y) == {f"{p}{i}@example.com" for p in "xy" for i in range(15)}


def test_an_unsigned_commit_in_the_data_dir_is_refused_then_replaced(data_dir: DataDir, tmp_path: Path) -> None:
    x, _ = _setup(data_dir)
    x.execute("add-user", PROJECT_A, {"email": "keep@example.com", "password": PASSWORD})
    good = x.head
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", str(data_dir.repo), str(work)], check=True)
    path = work / "domains/ex/example.com.yaml"
    path.write_text(path.read_text().replace("quota_mb: 1024", "quota_mb: 2048"))
    git_out(work, "-c", "user.name=x", "-c", "user.email=x@example.org", "commit", "-qam", "sneaky quota bump")
    git_out(work, "push", "-q", "origin", "main")
    bad = git_out(data_dir.repo, "rev-parse", "main").strip()

    users = x.execute("list-users", PROJECT_A).result["users"]
    assert [u["quota_mb"] for u in users] == [1024]  # still the last good state
    health = x.health()
    assert health["status"] == "degraded" and health["refused_commit"]["commit"] == bad
    assert "not signed by a trusted key" in health["refused_commit"]["problems"][0]

    out = x.execute("add-user", PROJECT_A, {"email": "later@example.com", "password": PASSWORD})
    assert git_out(data_dir.repo, "rev-parse", "main^").strip() == good
    assert out.result["commit"] == git_out(data_dir.repo, "rev-parse", "main").strip()
    assert git_out(data_dir.repo, "rev-parse", f"refs/mailstate/rejected/{bad}").strip() == bad
    assert x.health()["status"] == "ok"


def test_the_cli_and_a_running_store_share_a_data_dir(data_dir: DataDir) -> None:
    x, _ = _setup(data_dir)
    proc = subprocess.run(
        [
            "mailstate",
            "call",
            "--data",
            str(data_dir.root),
            "--project",
            str(PROJECT_A.project_id),
            "add-user",
            "email=cli@example.com",
            f"password={PASSWORD}",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    # The CLI process stated its own commit before it exited (no server needed for that).
    found = read_statement(pygit2.Repository(str(data_dir.repo)))
    assert found is not None
    assert (
        verify_statement(found[1], data_dir.allowed_signers).head == git_out(data_dir.repo, "rev-parse", "main").strip()
    )
    assert "cli@example.com" in _users(x)
    x.execute("add-user", PROJECT_A, {"email": "api@example.com", "password": PASSWORD})
    assert _users(open_store(data_dir.root)) == {"cli@example.com", "api@example.com"}
