"""Plan limits (state/limits.py) through the store: set-limits, list-limits, the 409s on every
write that would pass a limit (nothing committed), project files and domain limits in the
signed state, and the same rule in `mailstate check` and for commits made elsewhere. Real git,
real signatures; the HTTP/MCP surfaces and the race are in tests/test_controls_http.py."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailstate.compiler.render import render_domain
from mailstate.state import files
from mailstate.state.errors import Conflict, Forbidden, InvalidInput, LimitReached, NotFound
from mailstate.state.load import check_checkout, check_commit
from mailstate.state.store import Store
from mailstate.state.sync import validate_incoming
from tests.helpers.common import ADMIN, PASSWORD, PROJECT_A, PROJECT_B, commit_count, read_file, tree_paths

P = PROJECT_A.project_id


def add(store: Store, email: str, **extra: Any) -> dict[str, Any]:
    return store.execute("add-user", PROJECT_A, {"email": email, "password": PASSWORD, **extra}).result


def refused(store: Store, code: str, name: str, actor: Any, body: dict[str, Any]) -> LimitReached:
    before = commit_count(store.git.path)
    with pytest.raises(LimitReached) as exc:
        store.execute(name, actor, body)
    assert exc.value.code == code, exc.value.to_dict()
    assert commit_count(store.git.path) == before, "a refused write made a commit"
    return exc.value


def test_max_mailboxes_of_a_project_counts_every_domain_and_names_the_use(mail_store: Store) -> None:
    s = mail_store
    s.execute("link-domain", ADMIN, {"domain": "other.org", "project_id": P})
    s.execute("enable-email", PROJECT_A, {"domain": "other.org"})
    out = s.execute("set-limits", ADMIN, {"project_id": P, "max_mailboxes": 2}).result
    assert out["commit"] and out["limits"]["max_mailboxes"] == 2 and out["limits"]["storage_mb"] is None
    assert files.parse_project(s.git.read(out["commit"], files.project_path(P)) or b"", files.project_path(P))
    add(s, "two@other.org")
    err = refused(s, "limit_reached", "add-user", PROJECT_A, {"email": "three@example.com", "password": PASSWORD})
    body = err.to_dict()
    assert body["limit"] == "max_mailboxes" and body["max"] == 2 and body["use"] == 3
    assert "project 101" in body["message"].lower() and "max_mailboxes" in body["message"]
    # A soft-deleted mailbox frees its slot; restore-user would take it again and is refused.
    s.execute("remove-user", PROJECT_A, {"email": "two@other.org"})
    add(s, "three@example.com")
    refused(s, "limit_reached", "restore-user", PROJECT_A, {"email": "two@other.org"})
    # Another project is not concerned.
    s.execute("link-domain", ADMIN, {"domain": "b.org", "project_id": PROJECT_B.project_id})
    s.execute("enable-email", PROJECT_B, {"domain": "b.org"})
    for i in range(3):
        s.execute("add-user", PROJECT_B, {"email": f"u{i}@b.org", "password": PASSWORD})


def test_storage_quota_and_aliases(mail_store: Store) -> None:
    s = mail_store  # info@example.com has the default 1024 MB
    s.execute("set-limits", ADMIN, {"project_id": P, "storage_mb": 2048, "max_quota_mb": 1500, "max_aliases": 1})
    refused(
        s, "limit_reached", "add-user", PROJECT_A, {"email": "big@example.com", "password": PASSWORD, "quota_mb": 1600}
    )
    err = refused(
        s, "limit_reached", "add-user", PROJECT_A, {"email": "b@example.com", "password": PASSWORD, "quota_mb": 1025}
    )
    assert err.limit == "storage_mb" and err.use == 2049
    add(s, "b@example.com", quota_mb=1024)
    # A quota change (set-quota) is held to both.
    refused(s, "limit_reached", "set-quota", PROJECT_A, {"email": "b@example.com", "quota_mb": 1100})
    assert s.execute("set-quota", PROJECT_A, {"email": "b@example.com", "quota_mb": 500}).result["commit"]
    assert s.execute("set-quota", PROJECT_A, {"email": "b@example.com", "quota_mb": 500}).result["commit"] is None
    s.execute("add-alias", PROJECT_A, {"address": "sales@example.com", "destinations": ["info@example.com"]})
    refused(
        s, "limit_reached", "add-alias", PROJECT_A, {"address": "@example.com", "destinations": ["info@example.com"]}
    )


def test_domain_limits_and_enable_email(mail_store: Store) -> None:
    s = mail_store
    s.execute("set-limits", ADMIN, {"domain": "example.com", "max_mailboxes": 1})
    refused(s, "limit_reached", "add-user", PROJECT_A, {"email": "x@example.com", "password": PASSWORD})
    # The domain file carries its limits, in the signed state.
    dom = files.parse_domain(
        s.git.read(s.head, files.domain_path("example.com")) or b"", files.domain_path("example.com")
    )
    assert dom.limits is not None and dom.limits.max_mailboxes == 1
    # enable-email brings a domain's mailboxes into the project's count: a disabled domain that
    # holds mailboxes (an admin's pull request can make one) passes the limit when enabled.
    s.execute("set-limits", ADMIN, {"project_id": P, "max_mailboxes": 1})
    s.execute("link-domain", ADMIN, {"domain": "later.org", "project_id": P})
    snap = s.snapshot
    held = snap.domains["example.com"].mailboxes["info"]
    change = snap.domains["later.org"].model_copy(update={"mailboxes": {"held": held}})
    from mailstate.state.snapshot import Change

    s.commit_change(Change(domains={"later.org": change}), "test: a disabled domain that holds a mailbox\n")
    err = refused(s, "limit_reached", "enable-email", PROJECT_A, {"domain": "later.org"})
    assert err.target == "project 101"


def test_set_limits_refuses_a_limit_below_use_and_null_removes(mail_store: Store) -> None:
    s = mail_store
    add(s, "b@example.com")
    err = refused(s, "limit_below_use", "set-limits", ADMIN, {"project_id": P, "max_mailboxes": 1})
    assert err.use == 2 and err.value == 1
    s.execute("set-limits", ADMIN, {"project_id": P, "max_mailboxes": 2, "send_per_hour": 50})
    out = s.execute("set-limits", ADMIN, {"project_id": P, "max_mailboxes": None})
    assert out.result["limits"]["max_mailboxes"] is None and out.result["limits"]["send_per_hour"] == 50
    add(s, "c@example.com")
    # Removing the last limit removes the project file.
    s.execute("set-limits", ADMIN, {"project_id": P, "send_per_hour": None})
    assert s.git.read(s.head, files.project_path(P)) is None
    assert s.execute("set-limits", ADMIN, {"project_id": P, "send_per_hour": None}).result["commit"] is None


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"max_mailboxes": 3}, "invalid_scope"),
        ({"project_id": None, "max_mailboxes": 3}, "invalid_scope"),
        ({"project_id": P, "max_mailboxes": -1}, "invalid_limits"),
        ({"project_id": P, "max_mailboxes": True}, "invalid_limits"),
        ({"project_id": P, "max_mailboxes": "3"}, "invalid_limits"),
        ({"project_id": P, "max_mailboxes": 2.5}, "invalid_limits"),
        ({"project_id": P, "max_quota_mb": 0}, "invalid_limits"),
        ({"project_id": P, "send_per_hour": 10**9}, "invalid_limits"),
        ({"project_id": P, "max_boxes": 3}, "unknown_field"),
        ({"project_id": 0, "max_mailboxes": 3}, "invalid_project_id"),
    ],
)
def test_bad_limits_are_400_and_commit_nothing(mail_store: Store, body: dict[str, Any], code: str) -> None:
    before = commit_count(mail_store.git.path)
    with pytest.raises(InvalidInput) as exc:
        mail_store.execute("set-limits", ADMIN, body)
    assert exc.value.code == code, exc.value.to_dict()
    assert commit_count(mail_store.git.path) == before


def test_who_may_set_and_see_limits(mail_store: Store) -> None:
    s = mail_store
    with pytest.raises(Forbidden):
        s.execute("set-limits", PROJECT_A, {"project_id": P, "max_mailboxes": 9})
    with pytest.raises(NotFound):
        s.execute("set-limits", ADMIN, {"domain": "nowhere.org", "max_mailboxes": 9})
    with pytest.raises(NotFound):  # both: the domain, which must be that project's
        s.execute("set-limits", ADMIN, {"project_id": 999, "domain": "example.com", "max_mailboxes": 9})
    # Naming no limit changes nothing.
    assert s.execute("set-limits", ADMIN, {"project_id": P}).result["commit"] is None
    s.execute("set-limits", ADMIN, {"project_id": P, "max_mailboxes": 9, "send_per_day": 500})
    s.execute("set-limits", ADMIN, {"domain": "example.com", "max_aliases": 4, "send_per_hour": 20})
    mine = s.execute("list-limits", PROJECT_A, {}).result["limits"]
    assert [(e["project_id"], e["domain"]) for e in mine] == [(P, None), (P, "example.com")]
    project, domain = mine
    assert project["max_mailboxes"] == {"limit": 9, "use": 1}
    assert project["send_per_day"]["limit"] == 500 and project["send_per_day"]["effective"] == 500
    assert domain["max_aliases"] == {"limit": 4, "use": 0}
    # The domain's send_per_hour is its own; its send_per_day comes from the project.
    assert domain["send_per_hour"]["effective"] == 20 and domain["send_per_day"]["effective"] == 500
    # Project B sees only its own (empty) project, and nothing of A's.
    theirs = s.execute("list-limits", PROJECT_B, {}).result["limits"]
    assert [(e["project_id"], e["domain"]) for e in theirs] == [(PROJECT_B.project_id, None)]
    for body in ({"project_id": P}, {"domain": "example.com"}):
        with pytest.raises(NotFound):
            s.execute("list-limits", PROJECT_B, body)
    assert len(s.execute("list-limits", ADMIN, {}).result["limits"]) == 2


def test_check_and_incoming_commits_follow_the_same_rule(mail_store: Store, tmp_path: Path) -> None:
    s = mail_store
    add(s, "b@example.com")
    s.execute("set-limits", ADMIN, {"project_id": P, "max_mailboxes": 2})
    assert check_commit(s.git, s.head) == []
    # An admin's commit that adds a third mailbox by hand, rendered files and all, signed by a
    # trusted key: every path that takes a commit refuses it, by the same rule.
    dom = s.snapshot.domains["example.com"]
    extra = dom.mailboxes["b"].model_copy(update={"id": "20260101-abcdef"})
    grown = dom.model_copy(update={"mailboxes": {**dom.mailboxes, "c": extra}})
    changes = {files.domain_path("example.com"): files.dump_domain(grown), **render_domain(grown, s.snapshot.settings)}
    tree = s.git.build_tree(s.head, changes)
    sha = s.git.commit(tree, s.head, "by hand\n", s.signer, datetime.now(UTC))
    verdict = validate_incoming(s.git, s.snapshot, sha)
    assert any("project 101: max_mailboxes 2, but 3 in use" in p for p in verdict.problems), verdict.problems
    assert any("max_mailboxes 2, but 3 in use" in p for p in check_commit(s.git, sha))
    # The same state as a checkout (`mailstate check`).
    work = tmp_path / "work"
    for path in tree_paths(s.git.path, sha):
        target = work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(read_file(s.git.path, path, sha) or "")
    problems = check_checkout(work)
    assert any("project 101: max_mailboxes 2, but 3 in use" in p for p in problems), problems


def test_a_refused_change_leaves_the_state_as_it_was(mail_store: Store) -> None:
    s = mail_store
    s.execute("set-limits", ADMIN, {"domain": "example.com", "max_mailboxes": 1})
    head = s.head
    with pytest.raises(Conflict):
        add(s, "x@example.com")
    assert s.head == head and "x" not in s.snapshot.domains["example.com"].mailboxes


def test_plan_names_limit_and_sending_changes(mail_store: Store) -> None:
    from mailstate.state.plan import plan_revisions

    s = mail_store
    base = s.head
    s.execute("set-limits", ADMIN, {"project_id": P, "send_per_hour": 5, "max_mailboxes": 3})
    s.execute("set-limits", ADMIN, {"domain": "example.com", "max_aliases": 3})
    s.execute("suspend-sending", PROJECT_A, {"email": "info@example.com", "reason": "spam run"})
    pl = plan_revisions(s.git.path, base, s.head)
    assert [e.line() for e in pl.domains] == [
        "~ example.com: limits: max_aliases none -> 3",
        "~ project 101: limits: max_mailboxes none -> 3, send_per_hour none -> 5",
    ]
    assert [e.line() for e in pl.mailboxes] == ["~ info@example.com: sending suspended: spam run"]
    assert [e.name for e in pl.rendered] == ["rendered/domains/ex/example.com/sending"]
