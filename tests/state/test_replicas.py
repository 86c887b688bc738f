"""Replicas and failover on the server: set-replica and its hostile inputs, the one placement rule
on writes, `mailstate check` and incoming commits, rendered/replicas, the credentials a home gets
for its replica, failover-node, and the replication figures of list-nodes and /metrics. Through a
real store and a real local database (the node side is tests/e2e/test_failover_e2e.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from mailstate.api.cli import main
from mailstate.api.metrics import Metrics
from mailstate.state import fleet, placement
from mailstate.state.datadir import DataDir
from mailstate.state.errors import Conflict, InvalidInput
from mailstate.state.localdb import LocalDB
from mailstate.state.nodes import record_report
from mailstate.state.store import Store
from mailstate.state.sync import validate_incoming
from tests.helpers.common import ADMIN, PASSWORD, PROJECT_A, commit_count
from tests.helpers.store import err, show

A = PROJECT_A.project_id
NOW = datetime(2026, 2, 1, tzinfo=UTC)


@pytest.fixture
def db(data_dir: DataDir) -> Iterator[LocalDB]:
    """The node status database the store reads (a second connection to the same file)."""
    conn = LocalDB(data_dir.db)
    yield conn
    conn.close()


def fleet_of(store: Store, *names: str, unaddressed: tuple[str, ...] = ()) -> None:
    for i, name in enumerate(names, 1):
        store.execute("add-node", ADMIN, {"name": name, "address": f"mx{i}.fleet.example"})
    for name in unaddressed:
        store.execute("add-node", ADMIN, {"name": name})


def enabled(store: Store, name: str, node: str, users: int = 1) -> None:
    store.execute("link-domain", ADMIN, {"domain": name, "project_id": A})
    store.execute("enable-email", ADMIN, {"domain": name, "node": node})
    for i in range(users):
        store.execute("add-user", PROJECT_A, {"email": f"u{i}@{name}", "password": PASSWORD})


def listed(store: Store, name: str) -> dict[str, Any]:
    return next(d for d in store.execute("list-domains", ADMIN, {}).result["domains"] if d["domain"] == name)


def healthy(db: LocalDB, store: Store, *names: str, status: str = "ok") -> None:
    for name in names:
        body = {"status": status, "applied_commit": store.head}
        record_report(db, store.snapshot, name, body, None, datetime.now(UTC))


def test_set_replica_is_listed_rendered_and_removed(store: Store) -> None:
    fleet_of(store, "n1", "n2", "n3")
    enabled(store, "r.example", "n1")
    assert listed(store, "r.example")["replica"] is None
    out = store.execute("set-replica", ADMIN, {"domain": "r.example", "node": "n2"}).result
    assert out["commit"] and (out["home"], out["replica"]) == ("n1", "n2")
    assert listed(store, "r.example")["replica"] == "n2"
    assert "replica: n2\n" in (show(store, "domains/r./r.example.yaml") or "")
    assert show(store, "rendered/replicas") == "r.example n1 n2\n"
    assert dict(store.snapshot.replicas) == {"r.example": ("n1", "n2")}
    # Again: nothing; another node: changed; null: removed, and the file goes.
    assert store.execute("set-replica", ADMIN, {"domain": "r.example", "node": "n2"}).result["commit"] is None
    store.execute("set-replica", ADMIN, {"domain": "r.example", "node": "n3"})
    assert show(store, "rendered/replicas") == "r.example n1 n3\n"
    gone = store.execute("set-replica", ADMIN, {"domain": "r.example", "node": None}).result
    assert gone["commit"] and gone["replica"] is None
    assert show(store, "rendered/replicas") is None and "replica" not in (
        show(store, "domains/r./r.example.yaml") or ""
    )
    assert dict(store.snapshot.replicas) == {}


def test_hostile_replicas_are_clear_4xx_and_commit_nothing(store: Store) -> None:
    fleet_of(store, "n1", "n2", "n3", unaddressed=("bare",))
    enabled(store, "r.example", "n1")
    enabled(store, "t.example", "n2")
    store.execute("link-domain", ADMIN, {"domain": "alias.example", "project_id": A})
    store.execute("enable-email", ADMIN, {"domain": "alias.example", "node": "n1"})
    store.execute("add-alias-domain", PROJECT_A, {"domain": "alias.example", "target": "r.example"})
    cases = {
        ("r.example", "n1"): ("replica_not_usable", "is the home of r.example"),
        ("r.example", "bare"): ("node_not_usable", "has no address"),
        ("r.example", "ghost"): ("node_not_usable", "not registered"),
        ("alias.example", "n2"): ("replica_not_usable", "alias domain"),
    }
    for (domain, node), (code, words) in cases.items():
        e = err(store, "set-replica", ADMIN, {"domain": domain, "node": node})
        assert isinstance(e, Conflict) and e.code == code, (domain, node, e.code)
        assert words in e.message, e.message
    assert err(store, "set-replica", PROJECT_A, {"domain": "r.example", "node": "n2"}).code == "admin_required"
    assert err(store, "set-replica", ADMIN, {"domain": "none.example", "node": "n2"}).code == "domain_not_found"
    assert err(store, "failover-node", ADMIN, {"name": "ghost"}).code == "node_not_found"
    assert err(store, "failover-node", PROJECT_A, {"name": "n1"}).code == "admin_required"
    # A replica's node is in use; a domain with a replica cannot become an alias domain.
    store.execute("set-replica", ADMIN, {"domain": "r.example", "node": "n3"})
    e = err(store, "remove-node", ADMIN, {"name": "n3"})
    assert e.code == "node_in_use" and "replica of r.example" in e.message
    assert err(store, "set-node-address", ADMIN, {"name": "n3", "address": None}).code == "node_in_use"
    enabled(store, "s.example", "n1", users=0)
    store.execute("set-replica", ADMIN, {"domain": "s.example", "node": "n2"})
    e = err(store, "add-alias-domain", PROJECT_A, {"domain": "s.example", "target": "t.example"})
    assert e.code == "replica_not_usable"


def _clone(store: Store, tmp: Path) -> Path:
    work = tmp / "work"
    subprocess.run(["git", "clone", "-q", str(store.git.path), str(work)], check=True, capture_output=True)
    return work


def _commit_edit(work: Path, key: Path, rel: str, old: str, new: str) -> str:
    path = work / rel
    text = path.read_text()
    assert old in text, (rel, text)
    path.write_text(text.replace(old, new, 1))
    git = ["git", "-C", str(work), "-c", "user.name=x", "-c", "user.email=x@example.org", "-c", "gpg.format=ssh"]
    subprocess.run([*git, "-c", f"user.signingkey={key}", "commit", "-q", "-S", "-am", "edit"], check=True)
    subprocess.run([*git[:3], "push", "-q", "origin", "HEAD:refs/heads/edit"], check=True, capture_output=True)
    return subprocess.run([*git[:3], "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.e2e  # git and ssh-keygen run as processes
@pytest.mark.parametrize(
    ("old", "new", "why"),
    [
        ("replica: n2\n", "replica: n1\n", "replica: node n1 is the home of r.example"),
        ("replica: n2\n", "replica: bare\n", "replica: node bare has no address"),
        ("replica: n2\n", "replica: ghost\n", "replica: node ghost is not registered"),
    ],
)
def test_the_same_rule_refuses_incoming_commits_and_check(
    store: Store, data_dir: DataDir, tmp_path: Path, old: str, new: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet_of(store, "n1", "n2", unaddressed=("bare",))
    enabled(store, "r.example", "n1")
    store.execute("set-replica", ADMIN, {"domain": "r.example", "node": "n2"})
    work = _clone(store, tmp_path)
    sha = _commit_edit(work, data_dir.key, "domains/r./r.example.yaml", old, new)
    verdict = validate_incoming(store.git, store.snapshot, sha)
    assert not verdict.ok and any(why in p for p in verdict.problems), verdict.problems
    capsys.readouterr()
    assert main(["check", str(work)]) == 1
    assert why in capsys.readouterr().out


@pytest.mark.e2e  # git and ssh-keygen run as processes
def test_an_incoming_commit_with_a_hand_made_replicas_file_is_refused(
    store: Store, data_dir: DataDir, tmp_path: Path
) -> None:
    fleet_of(store, "n1", "n2", "n3")
    enabled(store, "r.example", "n1")
    store.execute("set-replica", ADMIN, {"domain": "r.example", "node": "n2"})
    work = _clone(store, tmp_path)
    sha = _commit_edit(work, data_dir.key, "rendered/replicas", "r.example n1 n2\n", "r.example n1 n3\n")
    verdict = validate_incoming(store.git, store.snapshot, sha)
    assert not verdict.ok and any("rendered/replicas" in p for p in verdict.problems), verdict.problems


def test_a_home_gets_its_replicas_doveadm_password_and_only_that(store: Store, tmp_path: Path) -> None:
    fleet_of(store, "n1", "n2", "n3")
    enabled(store, "r.example", "n1")
    key = fleet.fleet_key(tmp_path)
    assert fleet.credentials(key, store.snapshot, "n1")["peers"] == {}
    store.execute("set-replica", ADMIN, {"domain": "r.example", "node": "n2"})
    snap = store.snapshot
    peers = fleet.credentials(key, snap, "n1")["peers"]
    assert peers == {
        "n2": {"address": "mx2.fleet.example", "doveadm_password": fleet.doveadm_password(key, snap, "n2")}
    }
    assert fleet.credentials(key, snap, "n2")["peers"] == {} and fleet.credentials(key, snap, "n3")["peers"] == {}


def test_failover_moves_the_domains_with_a_healthy_replica_in_one_commit(store: Store, db: LocalDB) -> None:
    fleet_of(store, "n1", "n2", "n3")
    enabled(store, "a.example", "n1", users=2)
    enabled(store, "b.example", "n1")
    enabled(store, "c.example", "n1")
    enabled(store, "d.example", "n2")
    store.execute("set-replica", ADMIN, {"domain": "a.example", "node": "n2"})
    store.execute("set-replica", ADMIN, {"domain": "b.example", "node": "n3"})
    store.execute("set-replica", ADMIN, {"domain": "d.example", "node": "n1"})
    healthy(db, store, "n2")
    healthy(db, store, "n3", status="error")  # its last tick failed: no home for now
    before = commit_count(store.git.path)
    out = store.execute("failover-node", ADMIN, {"name": "n1"}).result
    assert out["moved"] == ["a.example"] and out["unavailable"] == ["b.example", "c.example"]
    assert commit_count(store.git.path) == before + 1 and out["commit"] == store.head
    a = listed(store, "a.example")
    assert (a["home"], a["replica"], a["moving_to"]) == ("n2", "n1", None)
    assert store.snapshot.domains["a.example"].moved_from == "n1"  # the old home merges what it alone holds
    assert show(store, "rendered/moves") == "a.example n2 - n1\n"
    assert show(store, "rendered/replicas") == "a.example n2 n1\nb.example n1 n3\nd.example n2 n1\n"
    assert "host=mx2.fleet.example\n" in (show(store, "rendered/domains/a./a.example/passwd") or "")
    assert listed(store, "d.example")["home"] == "n2"  # homed elsewhere: untouched
    rows = {n["name"]: (n["domains"], n["mailboxes"]) for n in store.execute("list-nodes", ADMIN, {}).result["nodes"]}
    assert rows == {"n1": (2, 2), "n2": (2, 3), "n3": (0, 0)}
    # Again: nothing left to move.
    again = store.execute("failover-node", ADMIN, {"name": "n1"}).result
    assert again["commit"] is None and again["moved"] == [] and again["unavailable"] == ["b.example", "c.example"]
    # The old home hands over and reports it: moved_from goes, n1 stays the replica.
    fleet.apply_report(store, "n1", _drained("a.example"))
    assert store.snapshot.domains["a.example"].moved_from is None and show(store, "rendered/moves") is None
    assert listed(store, "a.example")["replica"] == "n1"


def test_a_failed_over_node_that_never_returns_can_be_replaced_and_removed(store: Store, db: LocalDB) -> None:
    fleet_of(store, "n1", "n2", "n3")
    enabled(store, "a.example", "n1")
    store.execute("set-replica", ADMIN, {"domain": "a.example", "node": "n2"})
    healthy(db, store, "n2")
    store.execute("failover-node", ADMIN, {"name": "n1"})
    assert err(store, "remove-node", ADMIN, {"name": "n1"}).code == "node_in_use"
    store.execute("set-replica", ADMIN, {"domain": "a.example", "node": "n3"})
    dom = store.snapshot.domains["a.example"]
    assert (dom.home, dom.replica, dom.moved_from) == ("n2", "n3", None)  # n1's mail given up with it
    assert store.execute("remove-node", ADMIN, {"name": "n1"}).result["removed"] is True


def test_a_move_to_the_replica_swaps_home_and_replica(store: Store) -> None:
    fleet_of(store, "n1", "n2")
    enabled(store, "a.example", "n1")
    store.execute("set-replica", ADMIN, {"domain": "a.example", "node": "n2"})
    store.execute("move-domain", ADMIN, {"domain": "a.example", "node": "n2"})
    fleet.apply_report(store, "n2", _copied("a.example"))
    dom = store.snapshot.domains["a.example"]
    assert (dom.home, dom.replica, dom.moved_from) == ("n2", "n1", "n1")
    assert placement.replica_problem(dom, store.snapshot.nodes) is None


def test_list_nodes_and_metrics_show_the_replication_a_home_reports(store: Store, db: LocalDB) -> None:
    fleet_of(store, "n1", "n2")
    enabled(store, "a.example", "n1")
    store.execute("set-replica", ADMIN, {"domain": "a.example", "node": "n2"})
    body = {
        "status": "ok",
        "applied_commit": store.head,
        "replication": [{"peer": "n2", "domains": 1, "lag_s": 1.5, "last_sync_at": 1_800_000_000, "error": None}],
    }
    record_report(db, store.snapshot, "n1", body, None, datetime.now(UTC))
    record_report(db, store.snapshot, "n2", {"status": "ok", "replication": []}, None, datetime.now(UTC))
    nodes = {n["name"]: n for n in store.execute("list-nodes", ADMIN, {}).result["nodes"]}
    assert nodes["n1"]["replication"] == [
        {"peer": "n2", "domains": 1, "lag_s": 1.5, "last_sync_at": "2027-01-15T08:00:00+00:00", "error": None}
    ]
    assert nodes["n2"]["replication"] == []
    # A later report without the field keeps the figures; a failed sync shows its error.
    record_report(db, store.snapshot, "n1", {"status": "ok"}, None, datetime.now(UTC))
    assert store.execute("list-nodes", ADMIN, {}).result["nodes"][0]["replication"][0]["lag_s"] == 1.5
    failing = {"status": "ok", "replication": [{"peer": "n2", "domains": 1, "lag_s": 40, "error": "connect refused"}]}
    record_report(db, store.snapshot, "n1", failing, None, datetime.now(UTC))
    text = generate_latest(Metrics(store).registry).decode()
    assert 'mailstate_replication_lag_seconds{node="n1",peer="n2"} 40.0' in text
    assert 'mailstate_replication_ok{node="n1",peer="n2"} 0.0' in text
    for bad in ({"peer": "N2!", "domains": 1}, {"peer": "n2", "domains": -1}, {"peer": "n2", "lag_s": "x"}):
        with pytest.raises(InvalidInput):
            record_report(db, store.snapshot, "n1", {"status": "ok", "replication": [bad]}, None, NOW)


def _copied(domain: str) -> Any:
    from mailstate.state.nodes import parse_report

    return parse_report({"status": "ok", "moves": [{"domain": domain, "step": "copied"}]})


def _drained(domain: str) -> Any:
    from mailstate.state.nodes import parse_report

    return parse_report({"status": "ok", "moves": [{"domain": domain, "step": "drained"}]})


def test_plan_names_a_replica_change(store: Store) -> None:
    from mailstate.state.plan import plan_revisions

    fleet_of(store, "n1", "n2")
    enabled(store, "a.example", "n1")
    base = store.head
    store.execute("set-replica", ADMIN, {"domain": "a.example", "node": "n2"})
    pl = plan_revisions(store.git.path, base, store.head)
    assert [e.line() for e in pl.domains] == ["~ a.example: replica none -> n2"]
