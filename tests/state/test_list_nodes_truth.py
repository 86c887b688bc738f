"""list-nodes tells the truth: lag_s, commits_behind, diverged, stale with the
statement's age, the last error kept after a later ok, and the time and age of the last report;
the server marks a node stale when its last report is too old (MAILSTATE_NODE_STALE_AFTER).
A real store and local database, reports recorded as the HTTP edge records them
(state.nodes.record_report); the clock is the store's seam."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailstate.state.datadir import DataDir, open_store
from mailstate.state.localdb import LocalDB
from mailstate.state.nodes import REPORT_STALE_AFTER_S, record_report
from mailstate.state.store import Store
from tests.helpers.common import ADMIN

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


class Clock:
    """Stands still unless moved (list-nodes' `now` is the store's clock)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def row(store: Store, name: str = "n1") -> dict[str, Any]:
    nodes = store.execute("list-nodes", ADMIN, {}).result["nodes"]
    return next(n for n in nodes if n["name"] == name)  # type: ignore[no-any-return]


def report(db: LocalDB, store: Store, at: datetime, **body: Any) -> None:
    record_report(db, store.snapshot, "n1", {"status": "ok", **body}, "127.0.0.1", at)


@pytest.fixture
def env(data_dir: DataDir) -> Any:
    db = LocalDB(data_dir.db)
    clock = Clock()
    store = open_store(data_dir.root, clock=clock, db=db)
    store.execute("add-node", ADMIN, {"name": "n1"})
    yield store, db, clock
    db.close()


def test_before_any_report_everything_is_null(env: Any) -> None:
    store, _db, _clock = env
    r = row(store)
    assert r["status"] == "never_synced"
    assert {
        k: r[k] for k in ("lag_s", "stale", "statement_age_s", "last_report_at", "last_report_age_s", "last_error")
    } == dict.fromkeys(("lag_s", "stale", "statement_age_s", "last_report_at", "last_report_age_s", "last_error"))


def test_up_to_date_then_behind_with_its_lag(env: Any) -> None:
    store, db, clock = env
    head = store.head
    issued = int(T0.timestamp()) - 30
    report(db, store, T0 - timedelta(seconds=5), applied_commit=head, statement_issued_at=issued)
    r = row(store)
    assert (r["commits_behind"], r["lag_s"], r["diverged"], r["stale"]) == (0, 0, False, False)
    assert r["statement_age_s"] == 30 and r["last_report_age_s"] == 5
    assert r["last_report_at"] == r["last_sync_at"] == (T0 - timedelta(seconds=5)).isoformat()

    # Two accepted commits the node lacks; the lag counts from the older one.
    clock.now = T0 + timedelta(seconds=10)
    store.execute("add-domain", ADMIN, {"domain": "lag1.example"})
    clock.now = T0 + timedelta(seconds=40)
    store.execute("add-domain", ADMIN, {"domain": "lag2.example"})
    clock.now = T0 + timedelta(seconds=100)
    r = row(store)
    assert r["commits_behind"] == 2 and r["lag_s"] == 90 and r["diverged"] is False
    assert r["statement_age_s"] == 130  # the age grows while the node says nothing newer


def test_diverged_has_no_lag(env: Any) -> None:
    store, db, _clock = env
    report(db, store, T0, applied_commit="0" * 40)
    r = row(store)
    assert r["diverged"] is True and r["commits_behind"] is None and r["lag_s"] is None


def test_the_last_error_stays_after_a_later_ok(env: Any) -> None:
    store, db, _clock = env
    report(db, store, T0, status="error", error="fetch from https://x failed: timeout", applied_commit=store.head)
    r = row(store)
    assert (
        r["error"] == r["last_error"] == "fetch from https://x failed: timeout" and r["last_error_at"] == T0.isoformat()
    )
    report(db, store, T0 + timedelta(seconds=60), applied_commit=store.head)
    r = row(store)
    assert r["status"] == "ok" and r["error"] is None
    assert r["last_error"] == "fetch from https://x failed: timeout" and r["last_error_at"] == T0.isoformat()


def test_stale_as_reported_and_by_silence(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store, db, clock = env
    old = int(T0.timestamp()) - 900
    report(db, store, T0, status="stale", applied_commit=store.head, statement_issued_at=old)
    r = row(store)
    assert r["status"] == "stale" and r["stale"] is True and r["statement_age_s"] == 900
    # Recovery: an ok report with a fresh statement.
    report(db, store, T0, applied_commit=store.head, statement_issued_at=int(T0.timestamp()))
    assert row(store)["stale"] is False
    # Silence: no report for longer than the threshold makes it stale on the server's side.
    clock.now = T0 + timedelta(seconds=REPORT_STALE_AFTER_S)
    assert row(store)["stale"] is False
    clock.now = T0 + timedelta(seconds=REPORT_STALE_AFTER_S + 1)
    r = row(store)
    assert r["stale"] is True and r["status"] == "ok" and r["last_report_age_s"] == REPORT_STALE_AFTER_S + 1
    # The threshold is the operator's.
    monkeypatch.setenv("MAILSTATE_NODE_STALE_AFTER", str(REPORT_STALE_AFTER_S * 2))
    assert row(store)["stale"] is False
    monkeypatch.setenv("MAILSTATE_NODE_STALE_AFTER", "soon")  # nonsense: the default
    assert row(store)["stale"] is True


def test_an_older_database_gains_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE node_status (name TEXT PRIMARY KEY, last_sync_at TEXT NOT NULL, applied_commit TEXT, status TEXT NOT NULL, error TEXT, remote_addr TEXT)"
    )
    conn.execute("INSERT INTO node_status VALUES ('old', '2026-01-01T00:00:00+00:00', NULL, 'error', 'boom', NULL)")
    conn.commit()
    conn.close()
    db = LocalDB(path)
    try:
        st = db.node_status("old")
        assert (
            st is not None and st["error"] == "boom" and st["last_error"] is None and st["statement_issued_at"] is None
        )
        db.record_node_status(
            "old", applied_commit=None, status="ok", error=None, remote_addr=None, at=T0, statement_issued_at=5
        )
        st = db.node_status("old")
        assert st is not None and st["statement_issued_at"] == 5 and st["status"] == "ok"
    finally:
        db.close()
    LocalDB(path).close()  # opening again adds nothing twice
