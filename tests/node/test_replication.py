"""pipull/replication.py on real Maildirs: when a mailbox is synced with its replica, and what the
home reports. The doveadm sync itself is the agent's seam here (a recorder that may fail); the
real one runs between real Dovecots in tests/e2e/test_failover_e2e.py."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = False

    def __call__(self, user: str, peer: str, address: str, password: str) -> tuple[bool, str]:
        self.calls.append((user, peer))
        return (False, "connect refused") if self.fail else (True, "")


def maildir(root: Path, domain: str, name: str) -> Path:
    box = root / domain / name / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    return box


def deliver(box: Path, name: str, at: float) -> None:
    path = box / "new" / name
    path.write_text("Subject: x\n\nbody\n")
    os.utime(box / "new", (at, at))


def make(pipull: ModuleType, tmp_path: Path, clock: Clock, sync: Recorder) -> Any:
    replication = pipull.replication  # type: ignore[attr-defined]
    return replication.Replication(
        str(tmp_path / "fleet"), str(tmp_path / "vmail"), sync, logging.getLogger("t"), clock=clock
    )


def target(pipull: ModuleType, *boxes: tuple[str, str]) -> Any:
    return pipull.replication.Target("rep.test", "n2", "10.0.0.2", "msd_x", boxes)  # type: ignore[attr-defined]


def test_a_mailbox_is_synced_when_it_changes_and_the_report_says_how_far_behind(
    pipull: ModuleType, tmp_path: Path
) -> None:
    clock, sync = Clock(), Recorder()
    rep = make(pipull, tmp_path, clock, sync)
    a = maildir(tmp_path / "vmail", "rep.test", "ana~20260101-abcdef")
    maildir(tmp_path / "vmail", "rep.test", "bo~20260101-123456")
    boxes = (("ana", "20260101-abcdef"), ("bo", "20260101-123456"))
    rep.plan([target(pipull, *boxes)])
    assert rep.report() == [{"peer": "n2", "domains": 1, "lag_s": None, "last_sync_at": None, "error": None}]
    rep.run_pass(full=False)  # never synced: both
    assert sorted(sync.calls) == [("ana@rep.test", "n2"), ("bo@rep.test", "n2")]
    sync.calls.clear()
    rep.run_pass(full=False)
    assert sync.calls == []  # nothing changed
    deliver(a, "1.M1.host", clock.now - 3)
    clock.now += 1
    sync.fail = True
    rep.run_pass(full=False)
    assert sync.calls == [("ana@rep.test", "n2")]
    report = rep.report()[0]
    assert report["error"] == "connect refused" and report["lag_s"] == 4.0  # since the delivery, not the pass
    assert rep.failing() == {"n2"}
    sync.fail, sync.calls = False, []
    clock.now += 1
    rep.run_pass(full=False)
    assert sync.calls == []  # the change passes back off after a failure (2 s, doubling)...
    clock.now += 2
    rep.run_pass(full=False)
    assert sync.calls == [("ana@rep.test", "n2")] and rep.failing() == set()
    sync.fail, sync.calls = True, []
    deliver(a, "2.M2.host", clock.now)
    rep.run_pass(full=False)
    rep.run_pass(full=True)  # ...a tick's full pass does not
    assert sync.calls == [("ana@rep.test", "n2")] * 2
    sync.fail, sync.calls = False, []
    rep.run_pass(full=True)
    assert sync.calls == [("ana@rep.test", "n2")]
    assert rep.report()[0] == {"peer": "n2", "domains": 1, "lag_s": 0.0, "last_sync_at": int(clock.now), "error": None}
    # A flag change (a rename in cur/ and the index log growing) and a new folder are changes too.
    sync.calls = []
    (a / "dovecot.index.log").write_bytes(b"x" * 10)
    rep.run_pass(full=False)
    (a / ".Archive" / "cur").mkdir(parents=True)
    rep.run_pass(full=False)
    assert sync.calls == [("ana@rep.test", "n2")] * 2
    # The full pass syncs what was not synced for replicate_full_s; a pass without it does not.
    sync.calls = []
    clock.now += 601
    rep.run_pass(full=False)
    assert sync.calls == []
    rep.run_pass(full=True)
    assert sorted(sync.calls) == [("ana@rep.test", "n2"), ("bo@rep.test", "n2")]


def test_a_target_that_goes_is_forgotten_and_synced_afresh_when_it_returns(pipull: ModuleType, tmp_path: Path) -> None:
    clock, sync = Clock(), Recorder()
    rep = make(pipull, tmp_path, clock, sync)
    maildir(tmp_path / "vmail", "rep.test", "ana~20260101-abcdef")
    one = target(pipull, ("ana", "20260101-abcdef"))
    rep.plan([one])
    rep.run_pass(full=False)
    rep.plan([])  # a move began, or the replica went: nothing reported, nothing kept
    rep.run_pass(full=False)
    assert rep.report() == []
    rep.plan([one])
    sync.calls = []
    rep.run_pass(full=False)
    assert sync.calls == [("ana@rep.test", "n2")]
    assert "msd_x" not in (tmp_path / "fleet" / "replication.json").read_text()  # no secret in the state
