"""Sender ownership through a real store (compiler/maplines.py): the rendered sender_login_maps
after each write, the target's fragment re-rendered by alias-domain writes, every commit equal
to compile(state), and an incoming commit with a stale target fragment refused."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from mailstate.state.gitrepo import GitRepo
from mailstate.state.load import check_commit
from mailstate.state.store import Store
from mailstate.state.sync import validate_incoming
from tests.helpers.common import PASSWORD, PROJECT_A
from tests.helpers.store import linked, show

A = PROJECT_A


def smap(store: Store, domain: str) -> str | None:
    return show(store, f"rendered/domains/{domain[:2]}/{domain}/sender_login_maps")


def clean(store: Store) -> None:
    assert check_commit(GitRepo(store.git.path), store.head) == []


def test_sender_lines_follow_every_write(mail_store: Store, pipull: Any) -> None:
    s = mail_store  # example.com (project A) with info@
    assert smap(s, "example.com") == "info@example.com info@example.com\n"
    s.execute("add-user", A, {"email": "bob@example.com", "password": PASSWORD})
    s.execute(
        "add-alias",
        A,
        {"address": "team@example.com", "destinations": ["info@example.com", "bob@example.com", "x@gmail.com"]},
    )
    s.execute("add-alias", A, {"address": "@example.com", "destinations": ["info@example.com"]})  # no sender rights
    s.execute("set-forwarding", A, {"email": "bob@example.com", "destinations": ["bob@gmail.com"]})  # none either
    assert smap(s, "example.com") == (
        "bob@example.com bob@example.com\ninfo@example.com info@example.com\n"
        "team@example.com bob@example.com,info@example.com,x@gmail.com\n"
    )
    clean(s)
    # An alias domain: its addresses are in the target's fragment, written by add-alias-domain.
    linked(s, "old.example", A.project_id)
    s.execute("add-alias-domain", A, {"domain": "old.example", "target": "example.com"})
    text = smap(s, "example.com") or ""
    assert (
        "team@old.example bob@example.com,info@example.com,x@gmail.com\n" in text
        and "info@old.example info@example.com\n" in text
    )
    assert smap(s, "old.example") is None
    clean(s)
    check = pipull.sendermap.check_bytes("example.com", text.encode())
    pipull.sendermap.check_claims({"example.com": check}, {"old.example": "example.com"})
    # A change in the target reaches the alias domain's lines; soft delete takes both away.
    s.execute("remove-user", A, {"email": "bob@example.com"})
    text = smap(s, "example.com") or ""
    assert "bob@" not in text.replace("team@example.com info@example.com,x@gmail.com", "")
    assert "team@old.example info@example.com,x@gmail.com\n" in text
    clean(s)
    # The alias domain's own alias wins over the target's twin.
    s.execute("add-alias", A, {"address": "team@old.example", "destinations": ["info@example.com"]})
    assert "team@old.example" not in (smap(s, "example.com") or "")
    assert smap(s, "old.example") == "team@old.example info@example.com\n"
    clean(s)
    s.execute("remove-alias-domain", A, {"domain": "old.example"})
    assert "@old.example" not in (smap(s, "example.com") or "")
    clean(s)


@pytest.mark.e2e
def test_an_incoming_alias_domain_without_the_targets_lines_is_refused(
    mail_store: Store, data_dir: Any, tmp_path: Any
) -> None:
    from mailstate.api.cli import main

    linked(mail_store, "old.example", A.project_id)
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", str(data_dir.repo), str(work)], check=True)
    path = work / "domains/ol/old.example.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["email_enabled"] = True
    doc["alias_of"] = "example.com"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert main(["compile", str(work)]) == 0
    target = work / "rendered/domains/ex/example.com/sender_login_maps"
    assert "info@old.example" in target.read_text()
    target.write_text("info@example.com info@example.com\n")  # stale: as if only old.example were rendered
    git = ["git", "-C", str(work), "-c", "gpg.format=ssh", "-c", f"user.signingkey={data_dir.key}"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-S", "-m", "alias domain, stale target"], check=True)
    subprocess.run([*git, "push", "-q", "origin", "HEAD:refs/pr/1"], check=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    verdict = validate_incoming(mail_store.git, mail_store.snapshot, sha)
    assert not verdict.ok and any("example.com/sender_login_maps" in p for p in verdict.problems), verdict.problems
