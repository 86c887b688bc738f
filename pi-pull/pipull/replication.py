"""Replication: a home keeps each replicated domain's mailboxes in two-way ``doveadm sync`` with its replica.

What a node does comes from the live commit's ``rendered/replicas`` (validated when the release
was built, pipull/fleetfiles.py): for every domain whose home it is, it syncs each mailbox with
the replica over TLS to the replica's doveadm service, with the replica's password from ``GET
[fleet] url`` (granted by the signed state: the home of a domain with a replica). A domain in a
move (rendered/moves) is left to the move: its old home drains it into the new home first.

When: a mailbox is synced when it changed since its last sync, and at least every ``[fleet]
replicate_full_s`` (600 s) anyway. "Changed" is a cheap signature of the Maildir (per folder the
mtimes of ``new/`` and ``cur/`` and the size and mtime of ``dovecot.index.log``): a delivery
adds a file, a flag change renames one and appends to the index log, an expunge removes one, a
new folder is a new entry. Every tick runs a pass; follow mode also runs one every ``[fleet]
replicate_interval`` (1 s) in a thread, so a change reaches the replica within seconds, not at
the next tick. Passes never overlap (an flock on ``<fleet dir>/replication.lock``; a pass that
finds it held is skipped, the next one sees the same changes). dsync matches messages by GUID,
so a message is never copied twice, and it merges changes made on either side.

Reporting: per replica peer, ``lag_s`` is the age of the oldest change not yet synced (the
newest mtime of the signature that changed, so a change first seen late still counts from when
it happened; 0 when every mailbox is in sync), ``last_sync_at`` the last pass in which every
mailbox due for that peer synced, and ``error`` the last failure. State: ``<fleet
dir>/replication.json`` (0600, no secret in it).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .fsutil import atomic_write

LOCK = "replication.lock"
STATE = "replication.json"
BACKOFF_MAX_S = 300.0


@dataclass(frozen=True)
class Target:
    """One replicated domain of this node (its home), with the replica and every mailbox."""

    domain: str
    peer: str
    address: str
    password: str
    boxes: tuple[tuple[str, str], ...]  # (local, id)


Sync = Callable[[str, str, str, str], "tuple[bool, str]"]  # (user, peer, address, password) -> (ok, error)


@dataclass
class Replication:
    """See the module docstring. ``sync`` runs one ``doveadm sync`` (pipull.fleet.Fleet.replicate)."""

    fleet_dir: str
    mail_root: str
    sync: Sync
    log: logging.Logger
    full_s: float = 600.0
    budget_s: float = 20.0
    clock: Callable[[], float] = time.time
    targets: list[Target] = field(default_factory=list)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def plan(self, targets: list[Target]) -> None:
        """The targets of the live release (the tick sets them; follow mode's thread reads them)."""
        with self._guard:
            self.targets = list(targets)

    # ---- a pass

    def run_pass(self, *, full: bool) -> bool:
        """Sync what changed (and, with ``full``, what was not synced for ``full_s``); False when
        another pass held the lock (this one did nothing)."""
        with self._guard:
            targets = list(self.targets)
        if not targets and not os.path.exists(os.path.join(self.fleet_dir, STATE)):
            return True  # nothing replicated, nothing to forget
        os.makedirs(self.fleet_dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.fleet_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False
            state = self._load()
            before = json.dumps(state, sort_keys=True)
            self._pass(state, targets, full)
            if json.dumps(state, sort_keys=True) != before:
                self._save(state)
            return True
        finally:
            os.close(fd)

    def _pass(self, state: dict[str, Any], targets: list[Target], full: bool) -> None:
        boxes: dict[str, Any] = state.setdefault("boxes", {})
        peers: dict[str, Any] = state.setdefault("peers", {})
        wanted = {f"{local}@{t.domain} {t.peer}" for t in targets for local, _id in t.boxes}
        for key in [k for k in boxes if k not in wanted]:
            del boxes[key]  # no longer replicated (or in a move): synced afresh when it is again
        for name in [p for p in peers if p not in {t.peer for t in targets}]:
            del peers[name]
        started = self.clock()
        for target in targets:
            peer = peers.setdefault(target.peer, {"last_sync_at": None, "error": None})
            # After a failure the change passes wait (2 s doubling to 5 min) rather than try once a
            # second; a tick's full pass always tries.
            failed = not full and float(peer.get("retry_at") or 0) > started
            for local, box_id in target.boxes:
                key = f"{local}@{target.domain} {target.peer}"
                entry = boxes.setdefault(key, {"sig": None, "at": 0.0, "pending": None})
                sig, newest = self.signature(target.domain, local, box_id)
                now = self.clock()
                if sig != entry["sig"] and entry["pending"] is None:
                    entry["pending"] = min(now, newest) if newest else now
                due = entry["pending"] is not None or (full and now - entry["at"] >= self.full_s)
                if not due or failed or now - started > self.budget_s:
                    continue
                ok, error = self.sync(f"{local}@{target.domain}", target.peer, target.address, target.password)
                if not ok:
                    failed = True
                    entry["pending"] = entry["pending"] or now
                    failures = int(peer.get("failures") or 0) + 1
                    peer.update(error=error[:500] or "doveadm sync failed", failures=failures)
                    peer["retry_at"] = self.clock() + min(BACKOFF_MAX_S, 2.0 ** min(failures, 9))
                    continue
                peer.update(failures=0, retry_at=0)
                # The signature from before the sync: a change that came in during it (or what the
                # sync itself wrote here) makes the next pass sync again, at worst an empty sync.
                entry.update(sig=sig, at=now, pending=None)
            if not failed and not any(
                boxes[f"{lo}@{target.domain} {target.peer}"]["pending"] for lo, _ in target.boxes
            ):
                peer.update(last_sync_at=int(self.clock()), error=None)

    # ---- what a change looks like

    def signature(self, domain: str, local: str, box_id: str) -> tuple[str, float]:
        """(signature, newest mtime in it) of a mailbox's Maildir; ("-", 0) when there is none yet."""
        root = os.path.join(self.mail_root, domain, f"{local}~{box_id}", "Maildir")
        parts: list[str] = []
        newest = 0.0
        try:
            folders = ["", *sorted(e.name for e in os.scandir(root) if e.name.startswith(".") and e.is_dir())]
        except OSError:
            return "-", 0.0
        for folder in folders:
            for name in ("new", "cur", "dovecot.index.log"):
                try:
                    st = os.stat(os.path.join(root, folder, name))
                except OSError:
                    parts.append(f"{folder}/{name}:-")
                    continue
                parts.append(f"{folder}/{name}:{st.st_mtime_ns}:{st.st_size if name[0] == 'd' else 0}")
                newest = max(newest, st.st_mtime)
        return "|".join(parts), newest

    # ---- reporting

    def failing(self) -> set[str]:
        """The peers whose last sync failed (from the state file: a new process knows them too)."""
        peers = self._load().get("peers", {})
        return {name for name, peer in peers.items() if isinstance(peer, dict) and peer.get("error")}

    def report(self) -> list[dict[str, Any]]:
        """Per replica peer: domains, lag_s, last_sync_at, error (the server's ReplicationReport)."""
        with self._guard:
            targets = list(self.targets)
        state = self._load()
        boxes, peers = state.get("boxes", {}), state.get("peers", {})
        now = self.clock()
        out = []
        for name in sorted({t.peer for t in targets}):
            mine = [t for t in targets if t.peer == name]
            pending = [
                boxes[k]["pending"]
                for t in mine
                for lo, _ in t.boxes
                if isinstance(boxes.get(k := f"{lo}@{t.domain} {name}"), dict) and boxes[k].get("pending")
            ]
            peer = peers.get(name, {})
            synced = peer.get("last_sync_at")
            lag = round(max(0.0, now - min(pending)), 3) if pending else (0.0 if synced else None)
            out.append(
                {"peer": name, "domains": len(mine), "lag_s": lag, "last_sync_at": synced, "error": peer.get("error")}
            )
        return out

    # ---- the state file

    def _load(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.fleet_dir, STATE), encoding="utf-8") as fh:
                data = json.load(fh)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save(self, state: dict[str, Any]) -> None:
        data = (json.dumps(state, sort_keys=True) + "\n").encode()
        atomic_write(os.path.join(self.fleet_dir, STATE), data, 0o600)


def watch(replication: Replication, interval: float, stop: threading.Event, log: logging.Logger) -> None:
    """Follow mode's thread: a pass of what changed every ``interval`` seconds until ``stop``."""
    while not stop.wait(interval):
        try:
            replication.run_pass(full=False)
        except (OSError, ValueError) as e:
            log.warning(f"replication: {e}; trying again")
