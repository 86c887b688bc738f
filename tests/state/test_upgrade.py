"""The state format upgrade: a format-1 data dir becomes format 2 in exactly one
signed commit, by `mailstate upgrade` or by the server on start; logins never change.

The format-1 data dirs here are built the way the old code built them: a `format: 1`
mailstate.yaml without purge_after_days, mailboxes without ids, homes `<root>/<domain>/<local>`
(the format-1 golden cases prove the renderer still writes those bytes).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailstate.api.cli import main
from mailstate.state import files
from mailstate.state.datadir import DataDir, init_data_dir, open_store, upgrade_data_dir
from mailstate.state.errors import UpstreamUnavailable
from mailstate.state.gitrepo import GitRepo
from mailstate.state.load import check_checkout, check_commit, load_checkout
from mailstate.state.models import Settings
from mailstate.state.plan import plan_revisions
from mailstate.state.signing import Ed25519Signer
from mailstate.state.statement import REF as STATEMENT_REF
from mailstate.state.store import Store
from mailstate.state.upgrade import upgrade_store
from tests.helpers.common import (
    ADMIN,
    PASSWORD,
    PROJECT_A,
    FakeClock,
    commit_count,
    commit_message,
    git_out,
    make_key,
    read_file,
    rev_parse,
    tree_paths,
    verify_commit,
)

ID = re.compile(r"^[0-9]{8}-[0-9a-f]{6}$")
OLD_SETTINGS = b"format: 1\nmail_root: /var/vmail\nuid: 5000\ngid: 5000\ndefault_quota_mb: 1024\nbcrypt_cost: 4\n"


def format1_data_dir(root: Path) -> DataDir:
    """A data dir as the format-1 code left it, with active, soft-deleted and unusual mailboxes."""
    dd = init_data_dir(root, Settings(format=1, bcrypt_cost=4), clock=FakeClock(), keygen=make_key)
    assert read_file(dd.repo, "mailstate.yaml").encode() == OLD_SETTINGS  # the old file, byte for byte
    # A Store opened directly does not upgrade (open_store does): this is the old server at work.
    store = Store(dd.repo, Ed25519Signer(dd.key), clock=FakeClock(), cache_path=None)
    store.execute("link-domain", ADMIN, {"domain": "example.com", "project_id": PROJECT_A.project_id})
    store.execute("enable-email", PROJECT_A, {"domain": "example.com"})
    for email in ("info@example.com", "sales@example.com", "a.b+c@example.com", "gone@example.com"):
        store.execute("add-user", PROJECT_A, {"email": email, "password": PASSWORD})
    store.execute("remove-user", PROJECT_A, {"email": "gone@example.com"})  # soft-deleted: keeps its mail
    store.execute("add-domain", ADMIN, {"domain": "empty.org"})
    store.execute("link-domain", ADMIN, {"domain": "off.net", "project_id": 9})
    store.execute("add-node", ADMIN, {"name": "mpi01"})
    assert store.snapshot.settings.format == 1
    assert all(box.id is None for dom in store.snapshot.domains.values() for box in dom.mailboxes.values())
    assert tree_paths(dd.repo, "main", "rendered") == [
        f"rendered/domains/{b}/{d}/{f}"
        for b, d in (("em", "empty.org"), ("ex", "example.com"))
        for f in ("passwd", "virtual_mailbox_domains", "virtual_mailbox_maps")
    ]
    return dd


def checked_out(dd: DataDir, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(dd.repo), str(dest)], check=True, capture_output=True)
    return dest


def mailboxes_at(dd: DataDir, rev: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(read_file(dd.repo, "domains/ex/example.com.yaml", f"{rev}"))
    return dict(doc["mailboxes"])


@pytest.mark.e2e
def test_mailstate_upgrade_makes_one_signed_commit_and_keeps_every_login(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dd = format1_data_dir(tmp_path / "data")
    before_count = commit_count(dd.repo)
    before = mailboxes_at(dd, "main")
    old_passwd = read_file(dd.repo, "rendered/domains/ex/example.com/passwd")
    # `mailstate check` passes on the format-1 state
    assert main(["check", str(checked_out(dd, tmp_path / "before"))]) == 0

    assert main(["upgrade", "--data", str(dd.root)]) == 0
    out = capsys.readouterr().out
    assert "from format 1 to 2 in one signed commit" in out and "4 mailbox id(s)" in out

    assert commit_count(dd.repo) == before_count + 1
    assert verify_commit(dd).returncode == 0, verify_commit(dd).stderr
    assert git_out(dd.repo, "log", "-1", "--format=%s%n%(trailers:key=Action,valueonly)", "main").split("\n")[:2] == [
        "upgrade format 2",
        "upgrade",
    ]
    settings = files.parse_settings(read_file(dd.repo, "mailstate.yaml"))
    assert (settings.format, settings.purge_after_days, settings.bcrypt_cost) == (2, 7, 4)

    after = mailboxes_at(dd, "main")
    assert set(after) == set(before)
    ids = [box["id"] for box in after.values()]
    assert all(ID.fullmatch(i) for i in ids) and len(set(ids)) == len(ids)
    for local, box in after.items():
        # the login is untouched: same hash, quota and active flag
        assert {k: v for k, v in box.items() if k != "id"} == before[local], local
    assert after["gone"]["active"] is False  # a soft-deleted mailbox keeps its identity and mail

    # passwd: the same lines, but each home now carries the mailbox's id
    new_passwd = read_file(dd.repo, "rendered/domains/ex/example.com/passwd")
    expected = "".join(
        line.replace(f"/var/vmail/example.com/{local}::", f"/var/vmail/example.com/{local}~{after[local]['id']}::")
        + "\n"
        for line in old_passwd.splitlines()
        for local in [line.split("@", 1)[0]]
    )
    assert new_passwd == expected
    maps = read_file(dd.repo, "rendered/domains/ex/example.com/virtual_mailbox_maps")
    assert f"info@example.com example.com/info~{after['info']['id']}/\n" in maps
    listing = read_file(dd.repo, "rendered/domains/ex/example.com/mailboxes")
    assert listing == "".join(
        f"{local} {after[local]['id']} {'active' if after[local]['active'] else 'inactive'}\n"
        for local in sorted(after)
    )
    assert read_file(dd.repo, "rendered/domains/em/empty.org/mailboxes") == ""
    assert read_file(dd.repo, "rendered/settings") == "format 2\npurge_after_days 7\n"
    assert "rendered/domains/of" not in git_out(
        dd.repo, "ls-tree", "-r", "--name-only", "main"
    )  # disabled: still nothing

    # `mailstate check` passes after, on a checkout and on the commit
    assert main(["check", str(checked_out(dd, tmp_path / "after"))]) == 0
    assert check_commit(GitRepo(dd.repo), rev_parse(dd.repo)) == []

    # idempotent: nothing more to do, no commit, by the command or by opening the store
    capsys.readouterr()
    assert main(["upgrade", "--data", str(dd.root)]) == 0
    assert "already at format 2" in capsys.readouterr().out
    open_store(dd.root)
    assert upgrade_data_dir(dd.root) == {"upgraded": False, "format": 2, "commit": None}
    assert commit_count(dd.repo) == before_count + 1


@pytest.mark.e2e
def test_the_server_upgrades_on_start_and_serves_format_2(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from mailstate.api.server import create_app
    from mailstate.state.localdb import LocalDB

    dd = format1_data_dir(tmp_path / "data")
    count = commit_count(dd.repo)
    db = LocalDB(dd.db)
    _info, token = db.create_token(project_id=PROJECT_A.project_id, name="a")
    try:
        app = create_app(dd.root, db=db)
        assert commit_count(dd.repo) == count + 1  # the upgrade, before the first request
        with TestClient(app) as client:
            users = client.get("/v1/email-account/list-users", headers={"Authorization": f"Bearer {token}"}).json()[
                "users"
            ]
    finally:
        db.close()
    assert {u["email"]: bool(ID.fullmatch(u["id"])) for u in users} == {
        "a.b+c@example.com": True,
        "gone@example.com": True,
        "info@example.com": True,
        "sales@example.com": True,
    }
    assert verify_commit(dd).returncode == 0


@pytest.mark.e2e
def test_an_upgrade_made_by_another_process_is_validated_and_adopted(tmp_path: Path) -> None:
    """An old-format store running on the same data dir adopts the upgrade commit through the
    incoming-commit validation (signature, ids under the new format, every rendered file)."""
    dd = format1_data_dir(tmp_path / "data")
    old = Store(dd.repo, Ed25519Signer(dd.key), cache_path=None, trusted_signers=dd.allowed_signers)
    result = upgrade_data_dir(dd.root)
    assert result["upgraded"] is True
    users = old.execute("list-users", PROJECT_A, {}).result["users"]
    assert old.upstream_problem is None
    assert old.snapshot.settings.format == 2 and all(ID.fullmatch(u["id"]) for u in users)
    # and it writes format 2 from then on
    new = old.execute("add-user", PROJECT_A, {"email": "new@example.com", "password": PASSWORD}).result
    assert ID.fullmatch(new["id"])
    assert check_commit(GitRepo(dd.repo), old.head) == []


@pytest.mark.e2e
def test_plan_names_the_upgrade(tmp_path: Path) -> None:
    dd = format1_data_dir(tmp_path / "data")
    upgrade_data_dir(dd.root)
    result = plan_revisions(dd.repo, "main~1", "main")
    assert result.names("settings", "format_upgraded") == ["format"]
    assert result.names("settings", "setting_changed") == ["purge_after_days"]
    assert sorted(result.names("mailboxes", "mailbox_id_assigned")) == [
        "a.b+c@example.com",
        "gone@example.com",
        "info@example.com",
        "sales@example.com",
    ]
    rendered = {e.name: e.op for e in result.rendered}
    assert rendered["rendered/settings"] == "+"
    assert rendered["rendered/domains/ex/example.com/mailboxes"] == "+"
    assert rendered["rendered/domains/em/empty.org/mailboxes"] == "+"
    assert rendered["rendered/domains/ex/example.com/passwd"] == "~"
    text = result.render_text()
    assert "~ format: 1 -> 2 (state format upgrade" in text
    assert "BLF-CRYPT" not in text


@pytest.mark.e2e
def test_hand_edited_comments_survive_the_upgrade(tmp_path: Path) -> None:
    dd = format1_data_dir(tmp_path / "data")
    work = checked_out(dd, tmp_path / "work")
    path = work / "domains/ex/example.com.yaml"
    path.write_text("# ACME's domain, ticket OPS-7\n" + path.read_text())
    subprocess.run(["git", "-C", str(work), "commit", "-qam", "admin note"], check=True)
    subprocess.run(["git", "-C", str(work), "push", "-q", "origin", "HEAD:main"], check=True)
    # The admin's commit is unsigned; a store without trusted signers (as in a test repo) takes it.
    old = Store(dd.repo, Ed25519Signer(dd.key), cache_path=None)
    assert old.snapshot.commit == rev_parse(dd.repo)
    upgrade_store(old)
    text = read_file(dd.repo, "domains/ex/example.com.yaml")
    assert text.startswith("# ACME's domain, ticket OPS-7\n")
    assert all(ID.fullmatch(box["id"]) for box in yaml.safe_load(text)["mailboxes"].values())


# --- the format rule: ids present exactly in format 2 -------------------------------------------


def _checkout(tmp_path: Path, settings: str, boxes: str) -> Path:
    root = tmp_path / "co"
    (root / "domains/ex").mkdir(parents=True)
    (root / "mailstate.yaml").write_text(settings)
    (root / "domains/ex/example.com.yaml").write_text(
        f"domain: example.com\nproject_id: 1\nemail_enabled: true\nmailboxes:\n{boxes}"
    )
    return root


HASH = "{BLF-CRYPT}$2b$04$" + "a" * 53


def _box(local: str, box_id: str | None = None) -> str:
    line = f"    id: {box_id}\n" if box_id else ""
    return f"  {local}:\n{line}    password: '{HASH}'\n    quota_mb: 5\n    active: true\n"


@pytest.mark.parametrize(
    ("settings", "boxes", "problem"),
    [
        ("format: 2\n", _box("info"), "mailboxes.info.id: required in state format 2"),
        ("format: 1\n", _box("info", "20261201-abcdef"), "mailboxes.info.id: not allowed in state format 1"),
        ("{}\n", _box("info", "20261201-abcdef"), "not allowed in state format 1"),  # no format key: format 1
        (
            "format: 2\n",
            _box("info", "20261201-abcdef") + _box("sales", "20261201-abcdef"),
            "is used by another mailbox",
        ),
        ("format: 2\n", _box("info", "2026-12-01"), "Input should be a valid string"),  # YAML reads a date
        ("format: 2\n", _box("info", "'2026-12-01'"), "id must look like 20261201-3fa9c2"),
        ("format: 2\n", _box("info", "'../../etc'"), "id must look like"),
        ("format: 2\n", _box("info", "20261201-ABCDEF"), "id must look like"),
    ],
)
def test_the_loader_enforces_ids_per_the_format(tmp_path: Path, settings: str, boxes: str, problem: str) -> None:
    root = _checkout(tmp_path, settings, boxes)
    problems = load_checkout(root).problems
    assert any(problem in p for p in problems), problems
    assert any(problem in p for p in check_checkout(root))
    # the same rule when the file comes from a commit (parse_domain with the format)
    fmt = files.parse_settings(settings).format
    raw = (root / "domains/ex/example.com.yaml").read_bytes()
    with pytest.raises(Exception, match=re.escape(problem.split(": ")[-1][:20])):
        files.parse_domain(raw, "domains/ex/example.com.yaml", fmt)


def test_a_store_refuses_an_incoming_commit_that_drops_an_id(
    data_dir: DataDir, mail_store: Store, tmp_path: Path
) -> None:
    """A hand-made commit (signed by the server key, so only validation can stop it) that removes
    a mailbox id in a format-2 state is refused; the store keeps serving the last good state."""
    from mailstate.state.sync import validate_incoming

    path = "domains/ex/example.com.yaml"
    text = read_file(data_dir.repo, path)
    broken = re.sub(r"    id: [0-9a-f-]+\n", "", text).encode()
    change = {path: broken}
    tree = mail_store.git.build_tree(mail_store.head, change)
    sha = mail_store.git.commit(tree, mail_store.head, "drop an id\n", mail_store.signer, FakeClock()())
    verdict = validate_incoming(mail_store.git, mail_store.snapshot, sha)
    assert not verdict.ok
    assert any("id: required in state format 2" in p for p in verdict.problems), verdict.problems


@pytest.mark.e2e
def test_upgrade_in_upstream_mode_is_pushed_once_and_adopted_by_the_fleet(tmp_path: Path) -> None:
    """Two servers share an upstream holding a format-1 state. The first to start with the new
    code pushes the one upgrade commit; the other (still running) validates and adopts it, and
    starting it later makes no second upgrade."""
    from mailstate.state.upstream import Upstream

    up = tmp_path / "upstream.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(up)], check=True)
    a = init_data_dir(tmp_path / "a", Settings(format=1, bcrypt_cost=4), clock=FakeClock())
    b = init_data_dir(tmp_path / "b", Settings(format=1, bcrypt_cost=4), clock=FakeClock())
    trusted = a.allowed_signers.read_text() + b.allowed_signers.read_text()
    for dd in (a, b):
        dd.allowed_signers.write_text(trusted)

    def old_server(dd: DataDir) -> Store:  # the format-1 code: a Store that does not upgrade
        return Store(
            dd.repo,
            Ed25519Signer(dd.key),
            cache_path=None,
            upstream=Upstream(str(up), dd.repo),
            trusted_signers=dd.allowed_signers,
        )

    a_old = old_server(a)
    a_old.execute("add-domain", ADMIN, {"domain": "example.com", "project_id": PROJECT_A.project_id})
    a_old.execute("add-user", PROJECT_A, {"email": "info@example.com", "password": PASSWORD})
    b_old = old_server(b)  # joins the fleet
    assert b_old.snapshot.domains["example.com"].mailboxes["info"].id is None
    count = commit_count(up)

    a_new = open_store(a.root, upstream=str(up))  # restart with the new code: upgrade, pushed
    assert a_new.snapshot.settings.format == 2
    assert commit_count(up) == count + 1
    tip = rev_parse(up)
    assert a_new.head == tip and commit_message(up).splitlines()[0] == "upgrade format 2"
    verified = subprocess.run(
        ["git", "-C", str(up), "-c", f"gpg.ssh.allowedSignersFile={a.allowed_signers}", "verify-commit", tip],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stderr

    assert b_old.sync() is None  # validated (signature, ids under the new format, every rendered file)
    assert b_old.head == tip and b_old.snapshot.settings.format == 2
    assert (
        b_old.snapshot.domains["example.com"].mailboxes["info"].id
        == a_new.snapshot.domains["example.com"].mailboxes["info"].id
    )
    b_new = open_store(b.root, upstream=str(up))
    assert b_new.head == tip and commit_count(up) == count + 1


@pytest.mark.e2e
def test_a_server_whose_upstream_is_down_starts_and_upgrades_later(tmp_path: Path) -> None:
    dd = format1_data_dir(tmp_path / "data")
    up = tmp_path / "upstream.git"
    down = open_store(dd.root, upstream=str(up))  # no upstream yet: the upgrade waits, serving goes on
    assert down.snapshot.settings.format == 1
    assert down.execute("list-users", PROJECT_A, {}).result["users"][0]["id"] is None
    with pytest.raises(UpstreamUnavailable):
        upgrade_store(down)  # strict, as `mailstate upgrade` runs it: says so instead
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(up)], check=True)
    subprocess.run(["git", "-C", str(dd.repo), "push", "-q", str(up), "main"], check=True)
    up_again = open_store(dd.root, upstream=str(up))
    assert up_again.snapshot.settings.format == 2
    assert commit_message(up).splitlines()[0] == "upgrade format 2"


@pytest.mark.e2e
def test_a_format_2_state_from_before_sending_gets_its_sender_maps_in_one_signed_commit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A format-2 data dir whose commits predate sender_login_maps (the fragments removed by a
    signed commit, as the old code left it): `mailstate upgrade` adds every fragment in one
    signed commit, touches no domain file, and a second run does nothing."""
    dd = init_data_dir(tmp_path / "data", Settings(bcrypt_cost=4), clock=FakeClock(), keygen=make_key)
    store = Store(dd.repo, Ed25519Signer(dd.key), clock=FakeClock(), cache_path=None)
    for name, project in (("example.com", PROJECT_A.project_id), ("old.example", PROJECT_A.project_id)):
        store.execute("link-domain", ADMIN, {"domain": name, "project_id": project})
        store.execute("enable-email", PROJECT_A, {"domain": name})
    store.execute("add-user", PROJECT_A, {"email": "info@example.com", "password": PASSWORD})
    store.execute("add-alias", PROJECT_A, {"address": "sales@example.com", "destinations": ["info@example.com"]})
    store.execute("add-alias-domain", PROJECT_A, {"domain": "old.example", "target": "example.com"})
    path = "rendered/domains/ex/example.com/sender_login_maps"
    assert read_file(dd.repo, path) == (
        "info@example.com info@example.com\ninfo@old.example info@example.com\n"
        "sales@example.com info@example.com\nsales@old.example info@example.com\n"
    )
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", str(dd.repo), str(work)], check=True)
    subprocess.run(["git", "-C", str(work), "rm", "-q", path], check=True)
    git = [
        "git",
        "-C",
        str(work),
        "-c",
        "gpg.format=ssh",
        "-c",
        f"user.signingkey={dd.key}",
        "-c",
        "user.name=old",
        "-c",
        "user.email=old@x",
    ]
    subprocess.run([*git, "commit", "-q", "-S", "-m", "as the code before sending left it"], check=True)
    subprocess.run([*git, "push", "-q", "origin", "HEAD:main"], check=True)
    # and a statement of that head (the old server accepted it): here, none, so the store starts at main
    subprocess.run(["git", "-C", str(dd.repo), "update-ref", "-d", STATEMENT_REF], check=True)
    before = commit_count(dd.repo)
    old_tree = git_out(dd.repo, "ls-tree", "-r", "main", "domains")
    assert check_commit(GitRepo(dd.repo), rev_parse(dd.repo)) != []  # stale: the fragment is missing

    assert main(["upgrade", "--data", str(dd.root)]) == 0
    assert "rendered the sender_login_maps fragments (format 2) in one signed commit" in capsys.readouterr().out
    assert commit_count(dd.repo) == before + 1
    assert verify_commit(dd).returncode == 0
    assert git_out(dd.repo, "ls-tree", "-r", "main", "domains") == old_tree  # no domain file changed
    assert read_file(dd.repo, path).startswith("info@example.com info@example.com\n")
    assert check_commit(GitRepo(dd.repo), rev_parse(dd.repo)) == []
    assert main(["upgrade", "--data", str(dd.root)]) == 0
    assert "nothing to do" in capsys.readouterr().out and commit_count(dd.repo) == before + 1
