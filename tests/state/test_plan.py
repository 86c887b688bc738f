"""`mailstate plan`: hand-edited working trees and API-written revisions, with real git."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailstate.api.cli import main
from mailstate.state import files
from mailstate.state.datadir import DataDir
from mailstate.state.errors import InvalidInput, NotFound, StateInvalid
from mailstate.state.ops import hash_password
from mailstate.state.plan import load_revision, load_worktree, plan, plan_revisions, plan_worktree
from mailstate.state.store import Store
from tests.helpers.common import ADMIN, PROJECT_A, PROJECT_B, git_out

pytestmark = pytest.mark.e2e

HASH = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
DIGEST = re.compile(r"\b[0-9a-f]{64}\b")


def clone(repo: Path, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(repo), str(dest)], check=True, capture_output=True)
    return dest


def read_doc(root: Path, path: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((root / path).read_text())
    return doc


def write_doc(root: Path, path: str, doc: dict[str, Any], comment: str = "# edited by an admin\n") -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(comment + yaml.safe_dump(doc, sort_keys=False))


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_no_secrets(text: str, *hashes: str) -> None:
    assert not HASH.search(text), "a bcrypt hash leaked into the plan"
    assert "BLF-CRYPT" not in text
    assert not DIGEST.search(text), "a sync-key digest leaked into the plan"
    for h in hashes:
        assert h not in text
        assert h.split("$")[-1] not in text


@pytest.fixture
def rich_store(mail_store: Store) -> Store:
    """example.com (project A): info, sales, support; other.org (project A) enabled, no mailboxes;
    gone.net registered (project B, add-domain enables email); node mpi01 with an ip."""
    s = mail_store
    for local in ("sales", "support"):
        s.execute(
            "add-user",
            PROJECT_A,
            {"email": f"{local}@example.com", "password": "correct horse battery", "quota_mb": 512},
        )
    s.execute("link-domain", ADMIN, {"domain": "other.org", "project_id": PROJECT_A.project_id})
    s.execute("enable-email", PROJECT_A, {"domain": "other.org"})
    s.execute("add-domain", ADMIN, {"domain": "gone.net", "project_id": PROJECT_B.project_id})
    s.execute("add-node", ADMIN, {"name": "mpi01", "ip_address": "10.0.0.1"})
    s.execute("add-node", ADMIN, {"name": "mpi02"})
    return s


@pytest.fixture
def worktree(rich_store: Store, data_dir: DataDir, tmp_path: Path) -> Path:
    return clone(data_dir.repo, tmp_path / "wt")


def hand_edit(wt: Path) -> dict[str, str]:
    """The admin's pull request: every kind of change, made in the YAML by hand."""
    path = files.domain_path("example.com")
    doc = read_doc(wt, path)
    boxes = doc["mailboxes"]
    old_support = boxes["support"]["password"]
    new_hash = hash_password("a brand new secret", 4)
    bob_hash = hash_password("bob's long password", 4)
    boxes["bob"] = {"id": "20261201-b0b000", "password": bob_hash, "quota_mb": 256, "active": True}  # mailbox added
    boxes["info"]["quota_mb"] = 2048  # quota changed
    boxes["sales"]["active"] = False  # soft-deleted
    boxes["support"]["password"] = new_hash  # password changed
    write_doc(wt, path, doc)

    other = files.domain_path("other.org")
    doc = read_doc(wt, other)
    doc["email_enabled"] = False  # email disabled
    doc["project_id"] = PROJECT_B.project_id  # link moved
    write_doc(wt, other, doc)

    (wt / files.domain_path("gone.net")).unlink()  # domain removed
    write_doc(
        wt,
        files.domain_path("new.net"),
        {
            "domain": "new.net",
            "project_id": None,
            "email_enabled": True,
            "mailboxes": {"hi": {"id": "20261201-abcdef", "password": bob_hash, "quota_mb": 100, "active": False}},
        },
    )

    nodes = read_doc(wt, files.NODES_PATH)
    nodes["nodes"]["mpi01"]["ip_address"] = "10.0.0.9"
    del nodes["nodes"]["mpi02"]
    write_doc(wt, files.NODES_PATH, nodes)
    return {"old_support": old_support, "new": new_hash, "bob": bob_hash}


def test_plan_of_a_hand_edited_working_tree_names_every_change(
    worktree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hashes = hand_edit(worktree)
    result = plan_worktree(worktree)

    assert result.base.startswith("HEAD (") and result.head == "working tree"
    assert result.names("domains", "domain_added") == ["new.net"]
    assert result.names("domains", "domain_removed") == ["gone.net"]
    assert result.names("domains", "email_disabled") == ["other.org"]
    assert result.names("domains", "project_changed") == ["other.org"]
    assert result.names("mailboxes", "mailbox_added") == ["bob@example.com", "hi@new.net"]
    assert result.names("mailboxes", "quota_changed") == ["info@example.com"]
    assert result.names("mailboxes", "mailbox_deactivated") == ["sales@example.com"]
    assert result.names("mailboxes", "password_changed") == ["support@example.com"]
    assert result.names("mailboxes", "mailbox_removed") == []
    assert result.names("nodes", "node_ip_changed") == ["mpi01"]
    assert result.names("nodes", "node_removed") == ["mpi02"]
    assert result.settings == []
    rendered = {e.name: e.op for e in result.rendered}
    assert rendered == {
        "rendered/domains/ex/example.com/mailboxes": "~",
        "rendered/domains/go/gone.net/mailboxes": "-",
        "rendered/domains/ne/new.net/mailboxes": "+",
        "rendered/domains/ot/other.org/mailboxes": "-",
        "rendered/domains/ex/example.com/passwd": "~",
        "rendered/domains/ex/example.com/sender_login_maps": "~",
        "rendered/domains/ex/example.com/virtual_mailbox_maps": "~",
        "rendered/domains/go/gone.net/passwd": "-",
        "rendered/domains/go/gone.net/virtual_mailbox_domains": "-",
        "rendered/domains/go/gone.net/virtual_mailbox_maps": "-",
        "rendered/domains/ne/new.net/passwd": "+",
        "rendered/domains/ne/new.net/virtual_mailbox_domains": "+",
        "rendered/domains/ne/new.net/virtual_mailbox_maps": "+",
        "rendered/domains/ot/other.org/passwd": "-",
        "rendered/domains/ot/other.org/virtual_mailbox_domains": "-",
        "rendered/domains/ot/other.org/virtual_mailbox_maps": "-",
    }
    # passwd: bob in, sales out, info (quota) and support (hash) rewritten
    passwd = next(e for e in result.rendered if e.name.endswith("example.com/passwd"))
    assert (passwd.detail["lines_added"], passwd.detail["lines_removed"]) == (3, 3)

    text = result.render_text()
    for line in (
        "+ bob@example.com (quota 256 MB, id 20261201-b0b000)",
        "+ hi@new.net (quota 100 MB, inactive, id 20261201-abcdef)",
        "~ info@example.com: quota 1024 -> 2048 MB",
        "~ sales@example.com: deactivated (soft-deleted)",
        "~ support@example.com: password changed",
        "~ other.org: email disabled",
        "~ other.org: project link project 101 -> project 202",
        "- gone.net (project 202, email was enabled, 0 mailboxes)",
        "+ new.net (unlinked, email enabled, 1 mailbox (0 active))",
        "~ mpi01: ip 10.0.0.1 -> 10.0.0.9",
        "- mpi02",
        "- rendered/domains/ot/other.org/passwd",
        "~ rendered/domains/ex/example.com/passwd: +3 -3 lines",
    ):
        assert f"  {line}\n" in text, line
    # grouped in a stable order
    heads = [h for h in ("Domains:", "Mailboxes:", "Nodes:", "Compiled files (rendered/):") if h in text]
    assert [text.index(h) for h in heads] == sorted(text.index(h) for h in heads) and len(heads) == 4
    assert text == plan_worktree(worktree).render_text()

    code, out, err = run_cli(capsys, "plan", str(worktree))
    assert code == 0 and err == ""
    assert out == text
    code, md, _ = run_cli(capsys, "plan", str(worktree), "--markdown")
    assert (
        code == 0
        and md.startswith("### mailstate plan: `HEAD (")
        and "```diff" in md
        and "~ support@example.com: password changed" in md
    )
    code, js, _ = run_cli(capsys, "plan", str(worktree), "--json")
    data = json.loads(js)
    assert data["changed"] is True and data["summary"]["password_changed"] == 1
    assert {"op": "~", "name": "support@example.com", "change": "password changed", "kind": "password_changed"} in data[
        "mailboxes"
    ]
    for output in (text, md, js):
        assert_no_secrets(output, *hashes.values())


def test_reactivation_and_settings_change(worktree: Path) -> None:
    path = files.domain_path("example.com")
    doc = read_doc(worktree, path)
    doc["mailboxes"]["sales"]["active"] = False
    write_doc(worktree, path, doc)
    subprocess.run(["git", "-C", str(worktree), "commit", "-qam", "deactivate sales"], check=True)

    doc["mailboxes"]["sales"]["active"] = True
    write_doc(worktree, path, doc)
    settings = read_doc(worktree, files.SETTINGS_PATH)
    settings["uid"] = 6000
    write_doc(worktree, files.SETTINGS_PATH, settings)

    result = plan_worktree(worktree)
    assert result.names("mailboxes", "mailbox_reactivated") == ["sales@example.com"]
    assert [(e.name, e.detail["old"], e.detail["new"]) for e in result.settings] == [("uid", 5000, 6000)]
    # uid is in every passwd line: every non-empty passwd-file changes (other.org has no
    # mailboxes); the reactivation puts sales back into the Postfix map
    assert [e.name for e in result.rendered] == [
        "rendered/domains/ex/example.com/mailboxes",  # sales: inactive -> active
        "rendered/domains/ex/example.com/passwd",
        "rendered/domains/ex/example.com/sender_login_maps",  # sales may send again
        "rendered/domains/ex/example.com/virtual_mailbox_maps",
    ]
    maps = result.rendered[3]
    assert (maps.detail["lines_added"], maps.detail["lines_removed"]) == (1, 0)
    assert "~ uid: 5000 -> 6000" in result.render_text()
    # and against HEAD~1 (before the deactivation) only the settings change remains for sales
    older = plan_worktree(worktree, "HEAD~1")
    assert older.names("mailboxes", "mailbox_reactivated") == []


def test_fast_paths_agree_with_full_loads(worktree: Path, data_dir: DataDir) -> None:
    hand_edit(worktree)
    full = plan(load_revision(worktree, "HEAD"), load_worktree(worktree), base="b", head="h")
    fast = plan_worktree(worktree)
    assert {**fast.as_dict(), "base": "b", "head": "h"} == full.as_dict()

    subprocess.run(["git", "-C", str(worktree), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(worktree), "commit", "-qm", "admin edit"], check=True)
    full = plan(load_revision(worktree, "origin/main"), load_revision(worktree, "main"), base="b", head="h")
    fast = plan_revisions(worktree, "origin/main", "main")
    assert fast.base.startswith("origin/main (") and fast.head.startswith("main (")
    assert {**fast.as_dict(), "base": "b", "head": "h"} == full.as_dict()
    assert fast.names("mailboxes", "password_changed") == ["support@example.com"]


def test_revision_to_revision_on_the_bare_repo_after_api_writes(
    rich_store: Store, data_dir: DataDir, capsys: pytest.CaptureFixture[str]
) -> None:
    before = git_out(data_dir.repo, "rev-parse", "main").strip()
    rich_store.execute("add-user", PROJECT_A, {"email": "new@example.com", "password": "correct horse battery"})
    rich_store.execute("update-password", PROJECT_A, {"email": "info@example.com", "password": "another good one"})
    rich_store.execute("remove-user", PROJECT_A, {"email": "sales@example.com"})
    rich_store.execute("remove-user", PROJECT_A, {"email": "support@example.com", "hard_delete": True})
    rich_store.execute("disable-email", PROJECT_A, {"domain": "other.org"})
    rich_store.execute("remove-domain", ADMIN, {"domain": "gone.net"})
    rich_store.execute("rotate-node-key", ADMIN, {"name": "mpi01"})
    rich_store.execute("add-node", ADMIN, {"name": "mpi03", "ip_address": "10.0.0.3"})
    after = git_out(data_dir.repo, "rev-parse", "main").strip()

    result = plan_revisions(data_dir.repo, before, "main")
    assert result.base == before and result.head == f"main ({after[:12]})"
    assert result.names("mailboxes", "mailbox_added") == ["new@example.com"]
    assert result.names("mailboxes", "password_changed") == ["info@example.com"]
    assert result.names("mailboxes", "mailbox_deactivated") == ["sales@example.com"]
    assert result.names("mailboxes", "mailbox_removed") == ["support@example.com"]
    assert result.names("domains", "email_disabled") == ["other.org"]
    assert result.names("domains", "domain_removed") == ["gone.net"]
    assert result.names("nodes", "node_key_rotated") == ["mpi01"]
    assert result.names("nodes", "node_added") == ["mpi03"]

    code, out, err = run_cli(capsys, "plan", str(data_dir.repo), "--base", before, "--head", "main")
    assert code == 0 and err == ""
    for line in (
        "+ new@example.com (quota 1024 MB, id 20260201-",  # the id's date is the store's clock
        "~ info@example.com: password changed",
        "~ sales@example.com: deactivated (soft-deleted)",
        "- support@example.com",
        "~ other.org: email disabled",
        "- gone.net",
        "~ mpi01: sync key rotated",
        "+ mpi03 (ip 10.0.0.3)",
        "- rendered/domains/ot/other.org/passwd",
    ):
        assert line in out, line
    assert_no_secrets(out)

    # HEAD~N syntax and --head alone (base defaults to HEAD)
    code, out, _ = run_cli(capsys, "plan", str(data_dir.repo), "--base", "HEAD~1", "--head", "HEAD")
    assert code == 0 and "+ mpi03" in out and "mpi01" not in out
    code, out, _ = run_cli(capsys, "plan", str(data_dir.repo), "--head", "HEAD~2")
    assert code == 0 and "- mpi03" in out and "~ mpi01: sync key rotated" in out


def test_no_changes(worktree: Path, data_dir: DataDir, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "plan", str(worktree))
    assert code == 0 and out.splitlines()[-1] == "no changes"
    code, out, _ = run_cli(capsys, "plan", str(data_dir.repo), "--base", "main", "--head", "main", "--json")
    assert code == 0 and json.loads(out)["changed"] is False
    code, out, _ = run_cli(capsys, "plan", str(worktree), "--base", "origin/main", "--markdown")
    assert code == 0 and "**No changes**" in out
    # a comment or a reordering is not a change of state
    path = worktree / files.domain_path("example.com")
    path.write_text("# reviewed by ops\n" + path.read_text())
    assert not plan_worktree(worktree)


def test_invalid_working_tree_is_reported_clearly(worktree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = files.domain_path("example.com")
    doc = read_doc(worktree, path)
    doc["mailboxes"]["info"]["password"] = "hunter2hunter2"  # plain text: never allowed
    doc["mailboxes"]["info"]["quota_mb"] = 0
    write_doc(worktree, path, doc)
    with pytest.raises(StateInvalid) as caught:
        plan_worktree(worktree)
    assert len(caught.value.problems) == 2 and all(p.startswith(path) for p in caught.value.problems)
    assert "working tree" in caught.value.message

    code, out, err = run_cli(capsys, "plan", str(worktree))
    assert code == 1 and out == ""
    assert f"{path}: mailboxes.info.password" in err and "error: The working tree" in err
    assert "hunter2hunter2" not in err


def test_bad_sides(worktree: Path, data_dir: DataDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(NotFound):
        plan_worktree(worktree, "no-such-branch")
    code, _, err = run_cli(capsys, "plan", str(worktree), "--base", "no-such-branch")
    assert code == 3 and "Unknown revision 'no-such-branch'" in err
    with pytest.raises(InvalidInput):
        plan_worktree(data_dir.repo)  # bare: no working tree
    code, _, err = run_cli(capsys, "plan", str(data_dir.repo))
    assert code == 2 and "--head" in err
    with pytest.raises(InvalidInput):
        plan_worktree(worktree / "domains")  # the state sits at the top of the repo
    (tmp_path / "plain").mkdir()
    with pytest.raises(NotFound):
        plan_worktree(tmp_path / "plain")


def test_branch_names_and_origin(worktree: Path) -> None:
    git_out(worktree, "checkout", "-qb", "feature")
    path = files.domain_path("example.com")
    doc = read_doc(worktree, path)
    doc["mailboxes"]["info"]["quota_mb"] = 4096
    write_doc(worktree, path, doc)
    git_out(worktree, "commit", "-qam", "bigger inbox")
    result = plan_revisions(worktree, "origin/main", "feature")
    assert [(e.name, e.what) for e in result.mailboxes] == [("info@example.com", "quota 1024 -> 4096 MB")]
    assert not plan_worktree(worktree, "feature")


def test_render_limits_and_help(worktree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hand_edit(worktree)
    result = plan_worktree(worktree)
    text = result.render_text(limit=1)
    assert "  ... and 3 more\n" in text  # 4 mailbox entries, one shown
    assert len(result.render_text(limit=None)) >= len(result.render_text())
    with pytest.raises(SystemExit) as caught:
        main(["plan", "--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    for word in ("--base", "--head", "--markdown", "--json", "working tree", "HEAD~1", "never shown"):
        assert word in out
