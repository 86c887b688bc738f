"""Upstream mode at the library level: several writers on one bare repo, foreign commits.

Real bare repos in tmp dirs, real git push/fetch, real SSH signatures (server keys from
`mailstate init`, an admin key from ssh-keygen). The server-level twin (two `mailstate serve`
processes) lives in test_upstream_serve.py.
"""

from __future__ import annotations

import hashlib
import subprocess
import threading
from pathlib import Path

import pytest

from mailstate.state.datadir import DataDir, init_data_dir, open_store
from mailstate.state.errors import UpstreamUnavailable
from mailstate.state.models import Settings
from mailstate.state.ops import hash_password
from mailstate.state.signing import allowed_signers_line, generate_key
from mailstate.state.store import Store
from tests.helpers.common import ADMIN, PROJECT_A, FakeClock, git_out

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def fleet(tmp_path: Path) -> dict[str, object]:
    """An empty bare upstream, two server data dirs that trust each other, and an admin key."""
    up = tmp_path / "upstream.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(up)], check=True)
    a = init_data_dir(tmp_path / "a", Settings(bcrypt_cost=4), clock=FakeClock())
    b = init_data_dir(tmp_path / "b", Settings(bcrypt_cost=4), clock=FakeClock())
    admin_key = tmp_path / "admin_key"
    admin_pub = generate_key(admin_key, "admin@example.org")
    trusted = (
        a.allowed_signers.read_text()
        + b.allowed_signers.read_text()
        + allowed_signers_line(admin_pub, "admin@example.org")
    )
    for dd in (a, b):
        dd.allowed_signers.write_text(trusted)
    return {"up": up, "a": a, "b": b, "admin_key": admin_key, "tmp": tmp_path}


def _store(dd: DataDir, up: Path) -> Store:
    return open_store(dd.root, upstream=str(up))


def _admin_commit(fleet: dict[str, object], edit, *, sign: str | None = "admin", message: str = "admin change") -> str:
    """Clone upstream, apply `edit(worktree)`, commit (signed with the admin key or not), push."""
    tmp = fleet["tmp"]
    assert isinstance(tmp, Path)
    work = tmp / f"work-{len(list(tmp.glob('work-*')))}"
    subprocess.run(["git", "clone", "-q", str(fleet["up"]), str(work)], check=True)
    edit(work)
    git(work, "add", "-A")
    args = ["-c", "user.name=Admin", "-c", "user.email=admin@example.org"]
    if sign is not None:
        key = fleet["admin_key"] if sign == "admin" else sign
        args += ["-c", "gpg.format=ssh", "-c", f"user.signingkey={key}", "commit", "-S", "-qm", message]
    else:
        args += ["commit", "-qm", message]
    git(work, *args)
    git(work, "push", "-q", "origin", "main")
    return git(work, "rev-parse", "HEAD").strip()


def _setup_domain(store: Store) -> None:
    store.execute("link-domain", ADMIN, {"domain": "example.com", "project_id": PROJECT_A.project_id})
    store.execute("enable-email", PROJECT_A, {"domain": "example.com"})


def _mailbox_yaml(work: Path, local: str, password: str = PASSWORD, *, recompile: bool = True) -> None:
    """Hand-add a mailbox to example.com and recompile, as an admin would in a PR."""
    path = work / "domains/ex/example.com.yaml"
    text = path.read_text()
    if "mailboxes: {}" in text:
        text = text.replace("mailboxes: {}", "mailboxes:")
    box_id = "20261201-" + hashlib.sha256(local.encode()).hexdigest()[:6]  # state format 2: every mailbox has an id
    text += f"  {local}:\n    id: {box_id}\n    password: '{hash_password(password, 4)}'\n    quota_mb: 100\n    active: true\n"
    path.write_text(text)
    if recompile:
        from mailstate.api.cli import main

        assert main(["compile", str(work)]) == 0


def test_an_empty_upstream_receives_the_servers_history(fleet: dict[str, object]) -> None:
    a = _store(fleet["a"], fleet["up"])  # type: ignore[arg-type]
    assert git(fleet["up"], "rev-parse", "main").strip() == a.head  # type: ignore[arg-type]


def test_two_writers_lose_nothing(fleet: dict[str, object]) -> None:
    up = fleet["up"]
    a = _store(fleet["a"], up)  # type: ignore[arg-type]
    _setup_domain(a)
    b = _store(fleet["b"], up)  # type: ignore[arg-type]  # joins the existing upstream
    assert b.head == a.head
    before = int(git(up, "rev-list", "--count", "main"))  # type: ignore[arg-type]
    errors: list[BaseException] = []

    def work(store: Store, prefix: str) -> None:
        try:
            for i in range(30):
                store.execute("add-user", PROJECT_A, {"email": f"{prefix}{i}@example.com", "password": PASSWORD})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s, p)) for s, p in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert int(git(up, "rev-list", "--count", "main")) == before + 60  # type: ignore[arg-type]
    a.sync()
    b.sync()
    assert a.head == b.head == git(up, "rev-parse", "main").strip()  # type: ignore[arg-type]
    users = {u["email"] for u in a.execute("list-users", PROJECT_A).result["users"]}
    assert users == {f"{p}{i}@example.com" for p in "ab" for i in range(30)}
    # Every upstream commit is signed by one of the fleet's keys.
    for sha in git(up, "rev-list", "main").split():  # type: ignore[arg-type]
        subprocess.run(
            [
                "git",
                "-C",
                str(up),
                "-c",
                f"gpg.ssh.allowedSignersFile={fleet['a'].allowed_signers}",
                "verify-commit",
                sha,
            ],  # type: ignore[attr-defined]
            check=True,
            capture_output=True,
        )


def test_a_rejected_push_reruns_the_operation(fleet: dict[str, object]) -> None:
    up = fleet["up"]
    a = _store(fleet["a"], up)  # type: ignore[arg-type]
    _setup_domain(a)
    b = _store(fleet["b"], up)  # type: ignore[arg-type]
    a.execute("add-user", PROJECT_A, {"email": "x@example.com", "password": PASSWORD})
    # b has not seen a's commit: its push is rejected, it re-runs add-user on the new state,
    # which now answers with the conflict instead of overwriting a's mailbox.
    from mailstate.state.errors import Conflict

    with pytest.raises(Conflict) as err:
        b.execute("add-user", PROJECT_A, {"email": "x@example.com", "password": "another password"})
    assert err.value.code == "mailbox_exists"
    assert b.head == a.head


def test_admin_commit_signed_by_trusted_key_is_served(fleet: dict[str, object]) -> None:
    a = _store(fleet["a"], fleet["up"])  # type: ignore[arg-type]
    _setup_domain(a)
    sha = _admin_commit(fleet, lambda w: _mailbox_yaml(w, "admin-made"))
    assert a.sync() is None
    assert a.head == sha
    users = {u["email"] for u in a.execute("list-users", PROJECT_A).result["users"]}
    assert "admin-made@example.com" in users
    assert a.health()["status"] == "ok"
    # ... and the next API write builds on it.
    out = a.execute("add-user", PROJECT_A, {"email": "next@example.com", "password": PASSWORD})
    assert git(fleet["up"], "rev-parse", "main^").strip() == sha  # type: ignore[arg-type]
    assert git(fleet["up"], "rev-parse", "main").strip() == out.result["commit"]  # type: ignore[arg-type]


def _break_schema(work: Path) -> None:
    path = work / "domains/ex/example.com.yaml"
    path.write_text(path.read_text().replace("email_enabled: true", "email_enabled: true\nsurprise: 1"))


def _untrusted_key(fleet: dict[str, object]) -> str:
    key = Path(str(fleet["tmp"])) / "stranger_key"
    if not key.exists():
        generate_key(key, "stranger@example.org")
    return str(key)


@pytest.mark.parametrize(
    "case",
    ["unsigned", "untrusted", "schema", "stale_rendered", "hand_edited_rendered"],
)
def test_bad_upstream_commits_are_refused_and_writes_go_on(fleet: dict[str, object], case: str) -> None:
    up = fleet["up"]
    a = _store(fleet["a"], up)  # type: ignore[arg-type]
    _setup_domain(a)
    a.execute("add-user", PROJECT_A, {"email": "keep@example.com", "password": PASSWORD})
    good = a.head
    if case == "unsigned":
        bad = _admin_commit(fleet, lambda w: _mailbox_yaml(w, "sneaky"), sign=None)
    elif case == "untrusted":
        bad = _admin_commit(fleet, lambda w: _mailbox_yaml(w, "sneaky"), sign=_untrusted_key(fleet))
    elif case == "schema":
        bad = _admin_commit(fleet, _break_schema)
    elif case == "stale_rendered":
        bad = _admin_commit(fleet, lambda w: _mailbox_yaml(w, "ghost", recompile=False))
    else:

        def edit(w: Path) -> None:
            p = w / "rendered/domains/ex/example.com/passwd"
            p.write_text(p.read_text() + "evil@example.com:{PLAIN}x:5000:5000::/tmp::\n")

        bad = _admin_commit(fleet, edit)
    problem = a.sync()
    assert problem is not None and problem["commit"] == bad and problem["problems"]
    health = a.health()
    assert health["status"] == "degraded" and health["refused_commit"]["commit"] == bad
    assert a.head == good  # still serving the last good state
    users = {u["email"] for u in a.execute("list-users", PROJECT_A).result["users"]}
    assert "sneaky@example.com" not in users and "ghost@example.com" not in users
    # A later API write still works: it replaces the refused commit upstream, which is kept
    # in a local ref for the admins to inspect.
    out = a.execute("add-user", PROJECT_A, {"email": "later@example.com", "password": PASSWORD})
    assert git(up, "rev-parse", "main").strip() == out.result["commit"]  # type: ignore[arg-type]
    assert git(up, "rev-parse", "main^").strip() == good  # type: ignore[arg-type]
    assert git_out(fleet["a"].repo, "rev-parse", f"refs/mailstate/rejected/{bad}").strip() == bad  # type: ignore[attr-defined]
    assert a.health()["status"] == "ok"


def test_force_push_to_an_older_commit_is_refused(fleet: dict[str, object]) -> None:
    up = fleet["up"]
    a = _store(fleet["a"], up)  # type: ignore[arg-type]
    _setup_domain(a)
    old = a.head
    a.execute("add-user", PROJECT_A, {"email": "x@example.com", "password": PASSWORD})
    git(up, "update-ref", "refs/heads/main", old)  # type: ignore[arg-type]
    problem = a.sync()
    assert problem is not None and "does not descend" in problem["problems"][0]
    assert {u["email"] for u in a.execute("list-users", PROJECT_A).result["users"]} == {"x@example.com"}


def test_unreachable_upstream_is_a_503_with_no_local_divergence(fleet: dict[str, object], tmp_path: Path) -> None:
    up = fleet["up"]
    a = _store(fleet["a"], up)  # type: ignore[arg-type]
    _setup_domain(a)
    head = a.head
    moved = tmp_path / "moved.git"
    Path(str(up)).rename(moved)
    with pytest.raises(UpstreamUnavailable) as err:
        a.execute("add-user", PROJECT_A, {"email": "x@example.com", "password": PASSWORD})
    assert err.value.code == "upstream_unavailable"
    assert a.head == head
    assert git_out(fleet["a"].repo, "rev-parse", "main").strip() == head  # type: ignore[attr-defined]
    assert a.execute("list-users", PROJECT_A).result["users"] == []
    moved.rename(Path(str(up)))
    out = a.execute("add-user", PROJECT_A, {"email": "x@example.com", "password": PASSWORD})
    assert out.result["commit"] == git(up, "rev-parse", "main").strip()  # type: ignore[arg-type]


def test_admin_comment_survives_the_next_api_write(fleet: dict[str, object]) -> None:
    a = _store(fleet["a"], fleet["up"])  # type: ignore[arg-type]
    _setup_domain(a)
    a.execute("add-user", PROJECT_A, {"email": "info@example.com", "password": PASSWORD})

    def comment(work: Path) -> None:
        path = work / "domains/ex/example.com.yaml"
        text = path.read_text().replace(
            "mailboxes:\n", "mailboxes:\n  # info@ is read by the sales team (ticket 4711)\n"
        )
        path.write_text("# Customer: ACME, contract until 2027\n" + text)

    _admin_commit(fleet, comment)
    assert a.sync() is None
    a.execute("add-user", PROJECT_A, {"email": "sales@example.com", "password": PASSWORD})
    text = git(fleet["up"], "show", "main:domains/ex/example.com.yaml")  # type: ignore[arg-type]
    assert "# Customer: ACME, contract until 2027" in text
    assert "# info@ is read by the sales team (ticket 4711)" in text
    assert "sales:" in text


def test_settings_change_by_admin_is_fully_rechecked(fleet: dict[str, object]) -> None:
    a = _store(fleet["a"], fleet["up"])  # type: ignore[arg-type]
    _setup_domain(a)
    a.execute("add-user", PROJECT_A, {"email": "info@example.com", "password": PASSWORD})

    def bump_uid(work: Path) -> None:
        path = work / "mailstate.yaml"
        path.write_text(path.read_text().replace("uid: 5000", "uid: 6000"))

    # Without recompiling, the rendered passwd-file still says 5000: refused.
    bad = _admin_commit(fleet, bump_uid)
    problem = a.sync()
    assert problem is not None and problem["commit"] == bad
    assert any("passwd" in p for p in problem["problems"])

    def recompile(work: Path) -> None:
        from mailstate.api.cli import main

        assert main(["compile", str(work)]) == 0

    good = _admin_commit(fleet, recompile)
    assert a.sync() is None and a.head == good
    assert a.snapshot.settings.uid == 6000
