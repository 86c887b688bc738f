"""Where webhook events come from, and how they reach the outbox without delaying a write.

    domain_events(before, after)   mailbox.created / .deleted / .restored, domain.enabled /
                                   .disabled and sending.suspended, read off a domain file's change
    CommitEvents                   every commit on main, in order, turned into those events:
                                   the store's writes through its commit listener (in memory: the
                                   write only appends to a deque), anything else (`mailstate
                                   call`, an admin's push, upstream) by diffing git; the last
                                   commit done is kept with the outbox rows it made (one
                                   transaction), so a restart neither loses nor repeats one
    ReportEvents                   quota.threshold (80 % and 100 % of a mailbox's quota, from the
                                   nodes' usage figures) and sending.limited (a node's report)
    NodeEvents                     node.stale / node.recovered, by list-nodes' freshness rule
                                   (state.ops.node_freshness), looked at every few seconds
    dns_check_failed               dns.check_failed, from state/dnscheck.py's seam, when a domain's
                                   check goes from ok (or unchecked) to failing

Each event names its project (the domain's); node events have none (admin webhooks only).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pygit2

from mailstate.state import files
from mailstate.state.dnscheck import check_failed as log_check_failed
from mailstate.state.errors import MailstateError, StateInvalid
from mailstate.state.models import DomainFile
from mailstate.state.ops import bytes_to_mb, node_freshness
from mailstate.state.sending import SendingChange, auto_suspensions
from mailstate.state.snapshot import Actor, Snapshot
from mailstate.state.store import Committed, Store
from mailstate.state.webhooks import Event, Webhooks

log = logging.getLogger("mailstate.events")

CURSOR_KEY = "commit"
GATHER_S = 0.1  # seconds CommitEvents waits after a write for more, to batch them
QUOTA_LEVELS = (100, 80)  # percent of quota_mb, highest first


def _email(local: str, dom: DomainFile) -> str:
    return f"{local}@{dom.domain}"


def domain_events(before: DomainFile | None, after: DomainFile | None, at: datetime, commit: str) -> list[Event]:
    """The events a change of one domain file makes (either side None: the file is new or gone)."""
    out: list[Event] = []
    project = (after or before).project_id if (after or before) is not None else None  # type: ignore[union-attr]
    name = (after or before).domain if (after or before) is not None else ""  # type: ignore[union-attr]
    was_on = before is not None and before.email_enabled
    is_on = after is not None and after.email_enabled
    if is_on and not was_on:
        out.append(Event("domain.enabled", project, {"domain": name, "commit": commit}, at))
    old = before.mailboxes if before is not None else {}
    new = after.mailboxes if after is not None else {}
    for local in sorted(set(old) | set(new)):
        b, a = old.get(local), new.get(local)
        same = b is not None and a is not None and b.id == a.id
        dom = after if a is not None else before
        assert dom is not None
        data = {"email": _email(local, dom), "domain": name, "commit": commit}
        if b is not None and not same:
            out.append(Event("mailbox.deleted", project, {**data, "id": b.id, "hard_delete": True}, at))
        if a is not None and not same:
            out.append(Event("mailbox.created", project, {**data, "id": a.id, "quota_mb": a.quota_mb}, at))
        if same and b is not None and a is not None:
            if b.active and not a.active:
                out.append(Event("mailbox.deleted", project, {**data, "id": a.id, "hard_delete": False}, at))
            elif a.active and not b.active:
                out.append(Event("mailbox.restored", project, {**data, "id": a.id}, at))
        was_suspended = same and b is not None and b.sending is not None and b.sending.suspended
        if a is not None and a.sending is not None and a.sending.suspended and not was_suspended:
            reason = a.sending.reason or ""
            out.append(
                Event(
                    "sending.suspended",
                    project,
                    {**data, "id": a.id, "reason": reason, "automatic": reason.startswith("automatic:")},
                    at,
                )
            )
    if was_on and not is_on:
        out.append(Event("domain.disabled", project, {"domain": name, "commit": commit}, at))
    return out


def suspensions(before: DomainFile | None, after: DomainFile | None) -> dict[str, str]:
    """`suspended:<email>` -> "1"/"0" for each mailbox whose suspension changed (kept in event_state
    for /metrics' mailstate_mailboxes_sending{state="suspended"})."""
    out: dict[str, str] = {}
    dom = after or before
    if dom is None:
        return out
    old = before.mailboxes if before is not None and before.email_enabled else {}
    new = after.mailboxes if after is not None and after.email_enabled else {}
    for local in set(old) | set(new):
        b, a = old.get(local), new.get(local)
        was = b is not None and b.active and b.sending is not None and b.sending.suspended
        now = a is not None and a.active and a.sending is not None and a.sending.suspended
        if was != now:
            out[f"{SUSPENDED_PREFIX}{local}@{dom.domain}"] = "1" if now else "0"
    return out


SUSPENDED_PREFIX = "suspended:"


class CommitEvents:
    """Turns every commit of main into events, in order, off the write path (module docstring)."""

    def __init__(self, store: Store, hooks: Webhooks, clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.hooks = hooks
        self.clock = clock or (lambda: datetime.now(UTC))
        self._queue: deque[tuple[Committed, datetime]] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # one round at a time (the thread, or a test calling round())
        self.cursor = hooks.get_state(CURSOR_KEY)
        if self.cursor is None or not self._known(self.cursor):
            # First start (or a cursor from another repository): events start from now.
            self.cursor = store.head
            hooks.enqueue([], state={CURSOR_KEY: self.cursor})
        store.add_commit_listener(self.committed)

    def committed(self, item: Committed) -> None:
        """The store's commit listener: O(1), under the write lock."""
        self._queue.append((item, self.clock()))  # when it happened: webhooks made later do not get it
        self._wake.set()

    def _known(self, sha: str) -> bool:
        try:
            return self.store.git.is_ancestor(sha, self.store.head)
        except Exception:
            return False

    def run(self, stop: threading.Event, interval: float = 1.0, gather: float = GATHER_S) -> None:
        """Until `stop`: a round when a write wakes it (after `gather` seconds, so the writes of
        a busy moment make one batch: one transaction, one wake-up of the dispatcher), and at
        least every `interval` seconds (commits from elsewhere)."""
        while not stop.is_set():
            if self._wake.wait(interval):
                stop.wait(gather)
            self._wake.clear()
            try:
                self.round()
            except Exception:  # the loop must outlive one bad round
                log.exception("turning commits into events failed; trying again from the last commit kept")
                with self._lock:
                    # What was not kept is made again from git: the next round catches up from here.
                    self.cursor = self.hooks.get_state(CURSOR_KEY) or self.cursor

    def round(self) -> int:
        """Everything up to the store's head; returns the commits done."""
        with self._lock:
            git = self.store.git
            # The head first: the store tells its listeners of a write before the write becomes
            # the head, so every write up to this head is in the queue by now.
            head = self.store.head
            done = 0
            batch: list[Event] = []
            state: dict[str, str] = {}
            while self._queue:
                item, at = self._queue.popleft()
                if item.before.commit == self.cursor:
                    events, changes = self._from_change(item, at)
                    batch += events
                    state.update(changes)
                    self.cursor = item.commit  # kept with the batch's rows, in one transaction below
                    done += 1
                    continue
                self._flush(batch, state)
                batch, state = [], {}
                if self.cursor is not None and git.is_ancestor(item.commit, self.cursor):
                    continue  # done already (through git)
                done += self._catch_up(item.commit)
            self._flush(batch, state)
            if self.cursor is not None and not git.is_ancestor(head, self.cursor):
                done += self._catch_up(head)  # commits the store adopted from elsewhere
            return done

    def _flush(self, events: list[Event], state: dict[str, str]) -> None:
        if (events or state) and self.cursor is not None:
            self.hooks.enqueue(events, state={**state, CURSOR_KEY: self.cursor})

    def _emit(self, commit: str, events: list[Event], state: dict[str, str] | None = None) -> None:
        self.hooks.enqueue(events, state={**(state or {}), CURSOR_KEY: commit})
        self.cursor = commit

    def _from_change(self, item: Committed, at: datetime) -> tuple[list[Event], dict[str, str]]:
        out: list[Event] = []
        state: dict[str, str] = {}
        for name, new in sorted(item.change.domains.items()):
            old = item.before.domains.get(name)
            out += domain_events(old, new, at, item.commit)
            state.update(suspensions(old, new))
        return out, state

    def _catch_up(self, tip: str) -> int:
        """The commits between the cursor and `tip` (first parents, oldest first), from git."""
        git = self.store.git
        if self.cursor is None or not git.is_ancestor(self.cursor, tip):
            log.warning("events: %s does not descend from the last commit done; starting from it", tip[:12])
            self._emit(tip, [])
            return 0
        chain = []
        commit = git.repo[tip].peel(pygit2.Commit)
        while str(commit.id) != self.cursor and commit.parents:
            chain.append(commit)
            commit = commit.parents[0]
        at = self.clock()  # when this server learned of them (a committer's clock may be anything)
        for c in reversed(chain):
            self._emit(str(c.id), *self._from_git(str(c.parents[0].id), str(c.id), at))
        return len(chain)

    def _from_git(self, old: str, new: str, at: datetime) -> tuple[list[Event], dict[str, str]]:
        git = self.store.git
        out: list[Event] = []
        state: dict[str, str] = {}
        diff = git.tree(old).diff_to_tree(git.tree(new))
        names = set()
        for delta in diff.deltas:
            for path in (delta.old_file.path, delta.new_file.path):
                name = files.domain_from_path(path) if path else None
                if name is not None:
                    names.add(name)
        for name in sorted(names):
            path = files.domain_path(name)
            try:
                sides = [_parse(git.read(sha, path), path) for sha in (old, new)]
            except StateInvalid as exc:
                log.warning("events: %s at %s does not parse (%s); no events for it", path, new[:12], exc.message)
                continue
            out += domain_events(sides[0], sides[1], at, new)
            state.update(suspensions(sides[0], sides[1]))
        return out, state


def _parse(raw: bytes | None, path: str) -> DomainFile | None:
    return None if raw is None else files.parse_domain(raw, path)


class ReportEvents:
    """What a node's report changes (state.nodes.ReportListener): quota.threshold, sending.limited,
    and the suspensions a node made by itself, committed through suspend-sending as the system
    (state.sending.auto_suspensions), whose commit then makes the sending.suspended event."""

    actor = Actor.admin("system:sending")

    def __init__(self, store: Store, hooks: Webhooks) -> None:
        self.store = store
        self.hooks = hooks

    def usage_reported(self, snapshot: Snapshot, rows: list[tuple[str, str, str, int, int]], at: datetime) -> None:
        known = self.hooks.quota_levels(d for d, *_ in rows)
        levels: list[tuple[str, str, str, int]] = []
        events: list[Event] = []
        for domain, local, box_id, used, _messages in rows:
            dom = snapshot.domains.get(domain)
            box = dom.mailboxes.get(local) if dom is not None else None
            if dom is None or box is None:
                continue
            level = next((p for p in QUOTA_LEVELS if used * 100 >= p * box.quota_mb * 1048576), 0)
            was = known.get((domain, local, box_id), 0)
            if level == was:
                continue
            levels.append((domain, local, box_id, level))
            if level > was:
                data = {
                    "email": f"{local}@{domain}",
                    "domain": domain,
                    "id": box_id,
                    "percent": level,
                    "used_mb": bytes_to_mb(used),
                    "quota_mb": box.quota_mb,
                }
                events.append(Event("quota.threshold", dom.project_id, data, at))
        if levels:
            self.hooks.enqueue(events, levels=levels)

    def sending_changed(self, node: str, changes: list[SendingChange], at: datetime) -> None:
        find = project_of(self.store)
        events = [
            Event(
                "sending.limited",
                find(change.domain),
                {"email": change.email, "domain": change.domain, "node": node, **change.figures},
                at,
            )
            for change in changes
            if change.after == "limited" and change.before != "limited"
        ]
        if events:
            self.hooks.enqueue(events)
        for email, reason in auto_suspensions(self.store.snapshot.domains, changes):
            try:
                self.store.execute(
                    "suspend-sending", self.actor, {"email": email, "reason": reason}, request_id="auto-suspend"
                )
                log.warning("%s suspended: node %s passed auto_suspend_factor for it", email, node)
            except MailstateError as exc:
                log.error("could not record the suspension of %s by node %s: %s", email, node, exc.message)


class NodeEvents:
    """node.stale and node.recovered: list-nodes' `stale`, watched for changes (kept across restarts)."""

    def __init__(self, store: Store, hooks: Webhooks, clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.hooks = hooks
        self.clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()

    def run(self, stop: threading.Event, interval: float = 5.0) -> None:
        while not stop.wait(interval):
            try:
                self.round()
            except Exception:  # the loop must outlive one bad round
                log.exception("node freshness events failed")

    def round(self) -> int:
        """Look at every node once; returns the events made."""
        with self._lock:
            now = self.clock()
            events: list[Event] = []
            state: dict[str, str] = {}
            for name in sorted(self.store.snapshot.nodes.nodes):
                status = self.store.node_status(name) or {}
                fresh = node_freshness(status, int(now.timestamp()))
                if fresh["stale"] is None:
                    continue  # never reported: neither stale nor recovered
                key = f"node:{name}"
                was = self.hooks.get_state(key)
                stale = "1" if fresh["stale"] else "0"
                if was == stale or (was is None and stale == "0"):
                    if was is None:
                        state[key] = stale
                    continue
                state[key] = stale
                data = {
                    "node": name,
                    "last_report_at": fresh["last_report_at"],
                    "last_report_age_s": fresh["last_report_age_s"],
                    "statement_age_s": fresh["statement_age_s"],
                    "status": status.get("status"),
                }
                events.append(Event("node.stale" if stale == "1" else "node.recovered", None, data, now))
            if events or state:
                self.hooks.enqueue(events, state=state)
            return len(events)


def dns_check_failed(
    hooks: Webhooks, project_of: Callable[[str], int | None]
) -> Callable[[str, list[dict[str, Any]], bool | None], None]:
    """state/dnscheck.py's failure hook: log (its own seam), and a dns.check_failed event when the
    domain was ok before or never checked (not every hour while it stays broken)."""

    def hook(domain: str, records: list[dict[str, Any]], previous_ok: bool | None) -> None:
        log_check_failed(domain, records, previous_ok)
        if previous_ok is False:
            return
        failing = [
            {"type": r["type"], "name": r["name"], "status": r["status"], "purpose": r.get("purpose")}
            for r in records
            if r["status"] != "ok"
        ]
        data = {"domain": domain, "records": failing, "previously_ok": previous_ok}
        hooks.enqueue([Event("dns.check_failed", project_of(domain), data)])

    return hook


def project_of(store: Store) -> Callable[[str], int | None]:
    def find(domain: str) -> int | None:
        dom = store.snapshot.domains.get(domain)
        return dom.project_id if dom is not None else None

    return find
