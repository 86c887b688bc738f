"""Shared fixtures: throwaway data dirs with real keys, real git, and a clean environment.

Helpers and constants live in tests/helpers/; the fixtures a helper module defines (mailnode,
githost, ssh_githost) are registered here through ``pytest_plugins``, so no test module imports a
fixture. tests/helpers/spawnwatch.py fails a test that starts a process without the e2e marker.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pytest

# Before anything imports tests.helpers: their asserts get pytest's messages too.
pytest.register_assert_rewrite("tests.helpers")

from mailstate.state.datadir import DataDir, init_data_dir, open_store  # noqa: E402
from mailstate.state.localdb import LocalDB  # noqa: E402
from mailstate.state.models import Settings  # noqa: E402
from mailstate.state.store import Store  # noqa: E402
from tests.helpers.common import ADMIN, PASSWORD, PROJECT_A, FakeClock, make_key  # noqa: E402
from tests.helpers.mailnode import AGENT_DIR, PIPULL_MODULES, pi_pull_script  # noqa: E402

pytest_plugins = ["pytester", "tests.helpers.spawnwatch", "tests.helpers.mailnode", "tests.helpers.githost"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Nothing from the machine's git/gpg/ssh setup may leak into a test."""
    for name in list(os.environ):
        if name.startswith("GIT_"):
            monkeypatch.delenv(name, raising=False)
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("GNUPGHOME", raising=False)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_AUTHOR_NAME", "test")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "test@example.invalid")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "test")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "test@example.invalid")


@pytest.fixture
def test_settings(tmp_path: Path) -> Settings:
    return Settings(bcrypt_cost=4, mail_root="/var/vmail")


@pytest.fixture
def data_dir(tmp_path: Path, test_settings: Settings) -> DataDir:
    """An initialised data dir (bare repo, signing key, allowed_signers, db); bcrypt cost 4; its key
    made in process (the CLI tests make theirs with ssh-keygen)."""
    return init_data_dir(tmp_path / "data", test_settings, clock=FakeClock(), keygen=make_key)


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
    return pi_pull_script()


@pytest.fixture
def pipull(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The node agent package ``pipull``, all modules imported; pi-pull/ is on sys.path for this test only."""
    monkeypatch.syspath_prepend(str(AGENT_DIR))
    for name in PIPULL_MODULES:
        importlib.import_module(f"pipull.{name}")
    return importlib.import_module("pipull")


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
