"""Shared fixtures: throwaway data dirs with real keys, real git, and a clean environment."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest

from mailstate.state.datadir import DataDir, init_data_dir, open_store
from mailstate.state.localdb import LocalDB
from mailstate.state.models import Settings
from mailstate.state.snapshot import Actor
from mailstate.state.store import Store

ADMIN = Actor.admin("token:test-admin")
PROJECT_A = Actor.project(101, "token:project-a")
PROJECT_B = Actor.project(202, "token:project-b")
PASSWORD = "correct horse battery"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Nothing from the machine's git/gpg setup may leak into a test."""
    for name in list(os.environ):
        if name.startswith("GIT_"):
            monkeypatch.delenv(name, raising=False)
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("GNUPGHOME", raising=False)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_AUTHOR_NAME", "test")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "test@example.invalid")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "test")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "test@example.invalid")


class FakeClock:
    """A clock that advances one second per reading: commit times are distinct and stable."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def test_settings(tmp_path: Path) -> Settings:
    return Settings(bcrypt_cost=4, mail_root="/var/vmail")


@pytest.fixture
def data_dir(tmp_path: Path, test_settings: Settings) -> DataDir:
    """An initialised data dir (bare repo, signing key, allowed_signers, db); bcrypt cost 4."""
    return init_data_dir(tmp_path / "data", test_settings, clock=FakeClock())


@pytest.fixture
def store(data_dir: DataDir) -> Iterator[Store]:
    db = LocalDB(data_dir.db)
    yield open_store(data_dir.root, clock=FakeClock(datetime(2026, 2, 1, tzinfo=UTC)), db=db)
    db.close()


@pytest.fixture
def mail_store(store: Store) -> Store:
    """A store where project A owns example.com (email enabled) with one mailbox."""
    store.execute("link-domain", ADMIN, {"domain": "example.com", "project_id": PROJECT_A.project_id})
    store.execute("enable-email", PROJECT_A, {"domain": "example.com"})
    store.execute("add-user", PROJECT_A, {"email": "info@example.com", "password": PASSWORD})
    return store


@pytest.fixture(scope="session")
def pi_pull() -> Path:
    """The single-file node agent as a bundle ships it (a zipapp), built once per session."""
    from tests.helpers.mailnode import pi_pull_script

    return pi_pull_script()


@pytest.fixture
def pipull(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The node agent package ``pipull``, all modules imported; pi-pull/ is on sys.path for this test only."""
    import importlib

    from tests.helpers.mailnode import AGENT_DIR, PIPULL_MODULES

    monkeypatch.syspath_prepend(str(AGENT_DIR))
    for name in PIPULL_MODULES:
        importlib.import_module(f"pipull.{name}")
    return importlib.import_module("pipull")


def git_out(repo: Path, *args: str) -> str:
    """git's stdout in `repo` (raises on failure)."""
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def commit_count(repo: Path) -> int:
    return int(git_out(repo, "rev-list", "--count", "main").strip())


def verify_commit(data: DataDir, rev: str = "main") -> subprocess.CompletedProcess[str]:
    """Real `git verify-commit` against the data dir's allowed_signers."""
    return subprocess.run(
        ["git", "-C", str(data.repo), "-c", f"gpg.ssh.allowedSignersFile={data.allowed_signers}", "verify-commit", rev],
        capture_output=True,
        text=True,
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI=true nothing may skip: a skipped end-to-end test would hide a broken install."""
    if os.environ.get("CI") != "true":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        names = ", ".join(getattr(r, "nodeid", "?") for r in skipped[:10])
        print(f"\nCI=true forbids skipped tests; {len(skipped)} skipped: {names}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
