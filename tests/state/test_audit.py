"""The audit log: commit trailers read back with `git log`, filtered by domain, mailbox,
project and action; through `state.audit` and through `mailstate log`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from mailstate.api.cli import main
from mailstate.state.audit import filter_log, read_log
from mailstate.state.datadir import DataDir, open_store
from mailstate.state.snapshot import Actor
from mailstate.state.store import Store
from tests.helpers.common import ADMIN, PASSWORD, PROJECT_A, PROJECT_B

pytestmark = pytest.mark.e2e

A, B = PROJECT_A.project_id, PROJECT_B.project_id


@pytest.fixture
def history(store: Store) -> Store:
    """A small but varied history, oldest first."""
    calls = [
        ("link-domain", ADMIN, {"domain": "example.com", "project_id": A}, "r01"),
        ("enable-email", PROJECT_A, {"domain": "example.com"}, "r02"),
        ("link-domain", ADMIN, {"domain": "sub.example.com", "project_id": A}, "r03"),
        ("enable-email", PROJECT_A, {"domain": "sub.example.com"}, "r04"),
        ("add-domain", ADMIN, {"domain": "bee.org", "project_id": B}, "r05"),
        ("add-user", PROJECT_A, {"email": "info@example.com", "password": PASSWORD}, "r06"),
        ("add-user", PROJECT_A, {"email": "sales@example.com", "password": PASSWORD}, "r07"),
        ("add-user", PROJECT_A, {"email": "info@sub.example.com", "password": PASSWORD}, "r08"),
        ("add-user", PROJECT_B, {"email": "info@bee.org", "password": PASSWORD}, "r09"),
        ("update-password", PROJECT_A, {"email": "info@example.com", "password": "second password"}, "r10"),
        ("remove-user", PROJECT_A, {"email": "sales@example.com"}, "r11"),
        ("add-node", ADMIN, {"name": "mpi02"}, "r12"),
        ("rotate-node-key", ADMIN, {"name": "mpi02"}, "r13"),
    ]
    for op, actor, data, rid in calls:
        store.execute(op, actor, data, request_id=rid)
    # a read and a no-op leave no trace
    store.execute("list-users", PROJECT_A, {})
    store.execute("enable-email", PROJECT_A, {"domain": "example.com"}, request_id="noop")
    return store


def ids(entries) -> list[str]:
    return [e.request_id for e in entries]


def test_read_log_parses_every_commit(data_dir: DataDir, history: Store) -> None:
    entries = read_log(data_dir.repo)
    assert len(entries) == 14  # 13 writes + init
    assert entries[0].commit == history.head
    assert ids(entries)[:13] == [f"r{i:02d}" for i in range(13, 0, -1)]
    add = next(e for e in entries if e.request_id == "r09")
    assert (add.action, add.target, add.project, add.actor) == ("add-user", "info@bee.org", str(B), "token:project-b")
    assert add.subject == "add-user info@bee.org"
    assert add.date.startswith("2026-02-01T")
    init = entries[-1]
    assert (init.action, init.target, init.project) == ("init", "mailstate", "none")
    node = entries[0]
    assert (node.action, node.target, node.project, node.actor) == (
        "rotate-node-key",
        "mpi02",
        "none",
        "token:test-admin",
    )


def test_filter_by_domain_includes_its_mailboxes_but_not_subdomains(data_dir: DataDir, history: Store) -> None:
    entries = read_log(data_dir.repo)
    assert ids(filter_log(entries, domain="example.com")) == ["r11", "r10", "r07", "r06", "r02", "r01"]
    assert ids(filter_log(entries, domain="EXAMPLE.COM")) == ["r11", "r10", "r07", "r06", "r02", "r01"]
    assert ids(filter_log(entries, domain="sub.example.com")) == ["r08", "r04", "r03"]
    assert ids(filter_log(entries, domain="nowhere.example")) == []


def test_filter_by_mailbox(data_dir: DataDir, history: Store) -> None:
    entries = read_log(data_dir.repo)
    assert ids(filter_log(entries, mailbox="info@example.com")) == ["r10", "r06"]
    assert ids(filter_log(entries, mailbox="Sales@Example.com")) == ["r11", "r07"]
    assert ids(filter_log(entries, mailbox="info@sub.example.com")) == ["r08"]


def test_filter_by_project_and_action(data_dir: DataDir, history: Store) -> None:
    entries = read_log(data_dir.repo)
    assert ids(filter_log(entries, project=str(B))) == ["r09", "r05"]
    assert [e.action for e in filter_log(entries, project="none")] == ["rotate-node-key", "add-node", "init"]
    assert ids(filter_log(entries, action="add-user")) == ["r09", "r08", "r07", "r06"]
    assert ids(filter_log(entries, action="remove-domain")) == []
    # filters combine
    assert ids(filter_log(entries, action="add-user", project=str(A))) == ["r08", "r07", "r06"]
    assert ids(filter_log(entries, action="add-user", domain="example.com")) == ["r07", "r06"]
    assert ids(filter_log(entries, action="enable-email", domain="example.com", project=str(A))) == ["r02"]


def test_commits_without_trailers_are_listed(data_dir: DataDir, history: Store, tmp_path: Path) -> None:
    """A hand-made commit (an admin's PR) has no trailers; it still shows up, as '-'."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(data_dir.repo), str(clone)], check=True)
    f = clone / "domains/ex/example.com.yaml"
    f.write_text("# reviewed\n" + f.read_text())
    subprocess.run(["git", "-C", str(clone), "commit", "-qam", "annotate example.com"], check=True)
    subprocess.run(["git", "-C", str(clone), "push", "-q", "origin", "main"], check=True)
    entries = read_log(data_dir.repo)
    top = entries[0]
    assert (top.subject, top.action, top.project, top.actor, top.target) == ("annotate example.com", "-", "-", "-", "")
    assert filter_log(entries, action="add-user", domain="example.com")[0].request_id == "r07"
    # and the checkout reads the same log as the bare repo
    assert [e.commit for e in read_log(clone)] == [e.commit for e in entries]
    # later API writes still land with their trailers
    store = open_store(data_dir.root)
    store.execute("add-user", Actor.project(A), {"email": "late@example.com", "password": PASSWORD}, request_id="r14")
    assert ids(filter_log(read_log(data_dir.repo), mailbox="late@example.com")) == ["r14"]


# --- mailstate log -------------------------------------------------------------------------------


def cli_log(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, str]]:
    assert main(["log", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_log_filters(data_dir: DataDir, history: Store, capsys: pytest.CaptureFixture[str]) -> None:
    repo = str(data_dir.repo)
    assert [e["request_id"] for e in cli_log(capsys, repo, "--domain", "example.com")] == [
        "r11",
        "r10",
        "r07",
        "r06",
        "r02",
        "r01",
    ]
    assert [e["request_id"] for e in cli_log(capsys, repo, "--mailbox", "info@example.com")] == ["r10", "r06"]
    assert [e["request_id"] for e in cli_log(capsys, repo, "--project", str(B))] == ["r09", "r05"]
    assert [e["request_id"] for e in cli_log(capsys, repo, "--action", "add-node")] == ["r12"]
    assert [e["request_id"] for e in cli_log(capsys, repo, "--action", "add-user", "--limit", "2")] == ["r09", "r08"]
    entry = cli_log(capsys, repo, "--mailbox", "info@bee.org")[0]
    assert set(entry) >= {"commit", "date", "subject", "action", "target", "project", "actor", "request_id"}
    assert (
        entry["commit"]
        == subprocess.run(
            ["git", "-C", repo, "log", "-1", "--format=%H", "--grep", "Request-Id: r09"], capture_output=True, text=True
        ).stdout.strip()
    )


def test_cli_log_text_output(data_dir: DataDir, history: Store, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["log", str(data_dir.repo), "--domain", "bee.org"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert (
        "add-user" in lines[0]
        and "info@bee.org" in lines[0]
        and f"project={B}" in lines[0]
        and "request=r09" in lines[0]
    )
    assert "add-domain" in lines[1] and "bee.org" in lines[1] and "request=r05" in lines[1]
    # no match: no output, still success
    assert main(["log", str(data_dir.repo), "--mailbox", "ghost@example.com"]) == 0
    assert capsys.readouterr().out == ""


def test_cli_log_on_a_path_that_is_not_a_repo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["log", str(tmp_path)])
    assert code == 4
    assert "error" in capsys.readouterr().err


def test_git_log_trailers_is_itself_an_audit_log(data_dir: DataDir, history: Store) -> None:
    """The design's promise: `git log --format='%(trailers)'` is an audit log, without mailstate installed."""
    out = subprocess.run(
        [
            "git",
            "-C",
            str(data_dir.repo),
            "log",
            "--format=%(trailers:key=Action,valueonly)%(trailers:key=Request-Id,valueonly)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[:4] == ["rotate-node-key", "r13", "add-node", "r12"]
