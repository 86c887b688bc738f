"""The server's local database (SQLite): API tokens, node sync status, usage, DKIM public keys, DNS checks.

Neither belongs in git: tokens are secrets (only their SHA-256 is stored here), and a node
reporting every minute would drown the audit log.

A token looks like `mst_<id>_<secret>`. The id finds the row; the secret's SHA-256 is
compared in constant time, so a lookup leaks nothing about the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailstate.state.errors import Conflict, InvalidInput, NotFound, Unauthenticated
from mailstate.state.sending import SendingChange
from mailstate.state.snapshot import Actor

TOKEN_PREFIX = "mst_"
USAGE_BATCH = 2000  # usage rows written per transaction (and per hold of the lock)
_TOKEN = re.compile(r"^mst_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SENT_FIGURES = ("messages_hour", "recipients_hour", "messages_day", "recipients_day", "refused_hour")
_WORST = {"ok": 0, "limited": 1, "suspended": 2}

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    project_id INTEGER,
    secret_sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
-- Mailbox usage as the nodes measured it (never in git: it changes all the time). One row per
-- mailbox identity; the most recent report wins, whichever node sent it. The key starts with
-- the domain, so listing one domain's mailboxes reads only that domain's rows.
CREATE TABLE IF NOT EXISTS mailbox_usage (
    domain TEXT NOT NULL,
    local TEXT NOT NULL,
    mailbox_id TEXT NOT NULL,
    used_bytes INTEGER NOT NULL,
    messages INTEGER NOT NULL,
    node TEXT NOT NULL,
    reported_at TEXT NOT NULL,
    PRIMARY KEY (domain, local, mailbox_id)
) WITHOUT ROWID;
-- The nodes' DKIM public keys (pi-pull/pipull/dkim.py), as each last reported them; the
-- private keys never leave the nodes. dns-records reads them.
CREATE TABLE IF NOT EXISTS dkim_keys (
    node TEXT NOT NULL,
    selector TEXT NOT NULL,
    public_key TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    reported_at TEXT NOT NULL,
    PRIMARY KEY (node, selector)
) WITHOUT ROWID;
-- When a node last saw an app password log in (pi-pull/pipull/apppass.py): one row per app password
-- identity (its mailbox, name and creation time, so a new password of the same name starts afresh).
CREATE TABLE IF NOT EXISTS app_password_use (
    domain TEXT NOT NULL,
    local TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at TEXT NOT NULL,
    last_used_at TEXT NOT NULL,
    node TEXT NOT NULL,
    PRIMARY KEY (domain, local, name, created_at)
) WITHOUT ROWID;
-- The last DNS check of each domain (state/dnscheck.py): list-domains' dns_ok and dns_checked_at,
-- and when the background check may look at the domain again.
CREATE TABLE IF NOT EXISTS dns_checks (
    domain TEXT PRIMARY KEY,
    ok INTEGER NOT NULL,
    checked_at TEXT NOT NULL,
    checked_unix INTEGER NOT NULL
) WITHOUT ROWID;
-- What each node's policy service counted per login (pi-pull/pipull/policy.py, state/sending.py):
-- list-users' `sending` and `sent`, list-limits' send use. One row per login and node.
CREATE TABLE IF NOT EXISTS sending_reports (
    domain TEXT NOT NULL,
    local TEXT NOT NULL,
    node TEXT NOT NULL,
    state TEXT NOT NULL,
    token TEXT NOT NULL,
    messages_hour INTEGER NOT NULL,
    recipients_hour INTEGER NOT NULL,
    messages_day INTEGER NOT NULL,
    recipients_day INTEGER NOT NULL,
    refused_hour INTEGER NOT NULL,
    reported_at TEXT NOT NULL,
    PRIMARY KEY (domain, local, node)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS node_status (
    name TEXT PRIMARY KEY,
    last_sync_at TEXT NOT NULL,
    applied_commit TEXT,
    status TEXT NOT NULL,
    error TEXT,
    remote_addr TEXT
);
"""
# Columns added to node_status after its first release (list-nodes: freshness and the last
# error); an older database gets them on open (ALTER TABLE ... ADD COLUMN keeps every row).
NODE_STATUS_COLUMNS = {
    "statement_issued_at": "INTEGER",  # Issued-At of the newest statement the node verified
    "last_error": "TEXT",  # the last non-null error reported, kept after later ok reports
    "last_error_at": "TEXT",
    "replication": "TEXT",  # JSON: the node's last reported replication (state.nodes.ReplicationReport)
    "spam_filter": "TEXT",  # the inbound filter as the last report saw it (JSON, state.nodes.SpamFilterReport)
    "postscreen": "TEXT",  # port 25's postscreen refusals as the last report counted them (JSON, PostscreenReport)
}


def _replication(text: str | None) -> list[dict[str, Any]]:
    """A stored replication report (JSON written by state.nodes.record_report); [] without one."""
    try:
        found = json.loads(text) if text else []
    except ValueError:
        return []
    return [entry for entry in found if isinstance(entry, dict)] if isinstance(found, list) else []


def _json_object(text: object) -> dict[str, Any] | None:
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    id: str
    name: str
    project_id: int | None
    created_at: str
    revoked: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "role": "admin" if self.project_id is None else "project",
            "project_id": self.project_id,
            "created_at": self.created_at,
            "revoked": self.revoked,
        }


class LocalDB:
    """Tokens and node status in `DIR/mailstate.db`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(SCHEMA)
        have = {row[1] for row in self._conn.execute("PRAGMA table_info(node_status)")}
        for column, kind in NODE_STATUS_COLUMNS.items():
            if column not in have:
                self._conn.execute(f"ALTER TABLE node_status ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self._conn.close()

    # --- tokens ---------------------------------------------------------------------------

    def create_token(self, *, project_id: int | None, name: str | None = None) -> tuple[TokenInfo, str]:
        """A new token for a project (or admin when project_id is None); the secret is returned once."""
        token_id = secrets.token_hex(6)
        name = name or (f"project-{project_id}" if project_id is not None else "admin") + f"-{token_id[:4]}"
        if not _NAME.fullmatch(name):
            raise InvalidInput(
                "A token name is 1-64 letters, digits, '.', '_' or '-'.", code="invalid_token_name", field="name"
            )
        secret = secrets.token_urlsafe(32)
        now = datetime.now(UTC).replace(microsecond=0).isoformat()
        with self._lock:
            self._conn.execute(
                "INSERT INTO tokens (id, name, project_id, secret_sha256, created_at) VALUES (?, ?, ?, ?, ?)",
                (token_id, name, project_id, _sha256(secret), now),
            )
        return TokenInfo(token_id, name, project_id, now, False), f"{TOKEN_PREFIX}{token_id}_{secret}"

    def authenticate(self, token: str | None) -> Actor:
        """The actor a bearer token stands for, or Unauthenticated."""
        match = _TOKEN.fullmatch(token or "")
        row = None
        if match:
            with self._lock:
                row = self._conn.execute(
                    "SELECT name, project_id, secret_sha256, revoked_at FROM tokens WHERE id = ?", (match.group(1),)
                ).fetchone()
        # Compare even when there is no row, so that timing says nothing about which ids exist.
        expected = row[2] if row else _sha256("no such token")
        given = _sha256(match.group(2)) if match else ""
        if not hmac.compare_digest(expected, given) or row is None or row[3] is not None:
            raise Unauthenticated("A valid bearer token is required.", code="unauthenticated")
        return Actor(name=f"token:{row[0]}", project_id=row[1])

    def list_tokens(self) -> list[TokenInfo]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, name, project_id, created_at, revoked_at FROM tokens ORDER BY created_at, id"
            ).fetchall()
        return [TokenInfo(r[0], r[1], r[2], r[3], r[4] is not None) for r in rows]

    def revoke_token(self, token_id_or_name: str) -> TokenInfo:
        """Revoke ONE active token, named by its id or by a name that exactly one active token has.

        A name several active tokens share (names are not unique, across projects either) is
        refused with the candidates' ids, so that nothing is revoked by surprise."""
        now = datetime.now(UTC).replace(microsecond=0).isoformat()
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, name, project_id, created_at FROM tokens WHERE (id = ? OR name = ?) AND revoked_at IS NULL ORDER BY created_at, id",
                (token_id_or_name, token_id_or_name),
            ).fetchall()
            by_id = [r for r in rows if r[0] == token_id_or_name]
            if by_id:
                rows = by_id  # an id is unique; it wins over a name that happens to equal it
            if not rows:
                raise NotFound(f"No active token with id or name {token_id_or_name!r}.", code="token_not_found")
            if len(rows) > 1:
                listed = ", ".join(f"{r[0]} ({'admin' if r[2] is None else f'project {r[2]}'})" for r in rows)
                raise Conflict(
                    f"{len(rows)} active tokens are named {token_id_or_name!r}: {listed}; revoke one by its id.",
                    code="token_ambiguous",
                )
            token_id, name, project_id, created_at = rows[0]
            self._conn.execute("UPDATE tokens SET revoked_at = ? WHERE id = ?", (now, token_id))
        return TokenInfo(token_id, name, project_id, created_at, True)

    # --- node status ------------------------------------------------------------------------

    def record_node_status(
        self,
        name: str,
        *,
        applied_commit: str | None,
        status: str,
        error: str | None,
        remote_addr: str | None,
        at: datetime,
        statement_issued_at: int | None = None,
        replication: str | None = None,
        spam_filter: str | None = None,
        postscreen: str | None = None,
    ) -> None:
        """The node's last report. `last_error` keeps the last non-null error (and its time)
        after later reports without one, so list-nodes shows what last went wrong; `replication`
        is kept from an earlier report when this one has none."""
        stamp = at.isoformat()
        with self._lock:
            self._conn.execute(
                "INSERT INTO node_status (name, last_sync_at, applied_commit, status, error, remote_addr,"
                " statement_issued_at, last_error, last_error_at, replication, spam_filter, postscreen)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET last_sync_at=excluded.last_sync_at,"
                " applied_commit=excluded.applied_commit, status=excluded.status, error=excluded.error,"
                " remote_addr=excluded.remote_addr, statement_issued_at=excluded.statement_issued_at,"
                " spam_filter=excluded.spam_filter, postscreen=excluded.postscreen,"
                " last_error=COALESCE(excluded.last_error, node_status.last_error),"
                " last_error_at=COALESCE(excluded.last_error_at, node_status.last_error_at),"
                " replication=COALESCE(excluded.replication, node_status.replication)",
                (
                    name,
                    stamp,
                    applied_commit,
                    status,
                    error,
                    remote_addr,
                    statement_issued_at,
                    error,
                    stamp if error else None,
                    replication,
                    spam_filter,
                    postscreen,
                ),
            )

    # --- mailbox usage ------------------------------------------------------------------------

    def record_usage(self, node: str, rows: list[tuple[str, str, str, int, int]], at: datetime) -> None:
        """Store `(domain, local, mailbox id, used_bytes, messages)` rows a node measured.

        The latest report counts: a row is replaced by any report received at the same time or
        later, from whichever node (nodes sharing a mail root measure the same Maildir; nodes
        with their own copies converge on the same mail)."""
        stamp = at.isoformat()
        # In batches, each its own transaction: 100k rows take ~1 s, and the lock also guards
        # every token lookup, so one report may not hold it for more than a few ms at a time.
        for start in range(0, len(rows), USAGE_BATCH):
            batch = [(d, lp, i, b, n, node, stamp) for d, lp, i, b, n in rows[start : start + USAGE_BATCH]]
            with self._lock:
                self._conn.execute("BEGIN")
                try:
                    self._conn.executemany(
                        "INSERT INTO mailbox_usage (domain, local, mailbox_id, used_bytes, messages, node, reported_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(domain, local, mailbox_id) DO UPDATE SET"
                        " used_bytes=excluded.used_bytes, messages=excluded.messages, node=excluded.node,"
                        " reported_at=excluded.reported_at WHERE excluded.reported_at >= mailbox_usage.reported_at",
                        batch,
                    )
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise

    def usage_for(self, domains: list[str]) -> dict[str, dict[tuple[str, str], dict[str, Any]]]:
        """{domain: {(local, mailbox id): {"used_bytes", "messages", "reported_at", "node"}}} for
        the given domains only (an index range per domain; a whole-table read only when asked
        for so many domains that one pass is cheaper)."""
        out: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        wanted = set(domains)
        query = "SELECT domain, local, mailbox_id, used_bytes, messages, reported_at, node FROM mailbox_usage"
        with self._lock:
            if len(wanted) > 2000:
                batches = [self._conn.execute(query).fetchall()]
            else:
                names = sorted(wanted)
                batches = [
                    self._conn.execute(f"{query} WHERE domain IN ({','.join('?' * len(chunk))})", chunk).fetchall()
                    for chunk in (names[i : i + 500] for i in range(0, len(names), 500))
                ]
        for rows in batches:
            for domain, local, box_id, used, messages, at, node in rows:
                if domain in wanted:
                    out.setdefault(domain, {})[(local, box_id)] = {
                        "used_bytes": used,
                        "messages": messages,
                        "reported_at": at,
                        "node": node,
                    }
        return out

    # --- sending figures ---------------------------------------------------------------------------

    def record_sending(self, node: str, rows: list[tuple[Any, ...]], at: datetime) -> list[SendingChange]:
        """Store a node's `(domain, local, state, token, mh, rh, md, rd, refused)` rows; returns the
        logins whose state (ok, limited, suspended) changed for that node, and every suspended one
        (so a suspension the server could not record yet is tried again with the next report)."""
        stamp = at.isoformat()
        changes: list[SendingChange] = []
        for start in range(0, len(rows), USAGE_BATCH):
            batch = rows[start : start + USAGE_BATCH]
            with self._lock:
                self._conn.execute("BEGIN")
                try:
                    for row in batch:
                        old = self._conn.execute(
                            "SELECT state FROM sending_reports WHERE domain = ? AND local = ? AND node = ?",
                            (row[0], row[1], node),
                        ).fetchone()
                        if old is None or old[0] != row[2] or row[2] == "suspended":
                            figures = dict(zip(_SENT_FIGURES, row[4:], strict=True))
                            changes.append(
                                SendingChange(row[0], row[1], old[0] if old else None, row[2], row[3], figures)
                            )
                    self._conn.executemany(
                        "INSERT OR REPLACE INTO sending_reports (domain, local, node, state, token, messages_hour,"
                        " recipients_hour, messages_day, recipients_day, refused_hour, reported_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [(r[0], r[1], node, *r[2:], stamp) for r in batch],
                    )
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
        return changes

    def sending_for(self, domains: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
        """{domain: {local: figures}} for the given domains: each login's figures summed over the
        nodes that reported it, its worst state (suspended, limited, ok) and that report's token."""
        names = sorted(set(domains))
        out: dict[str, dict[str, dict[str, Any]]] = {}
        with self._lock:
            rows = []
            for i in range(0, len(names), 500):
                chunk = names[i : i + 500]
                rows += self._conn.execute(
                    "SELECT domain, local, state, token, messages_hour, recipients_hour, messages_day, recipients_day,"
                    f" refused_hour, reported_at FROM sending_reports WHERE domain IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
        for domain, local, state, token, *figures, at in rows:
            entry = out.setdefault(domain, {}).get(local)
            if entry is None:
                entry = out[domain][local] = {
                    "state": state,
                    "token": token,
                    "reported_at": at,
                    **dict.fromkeys(_SENT_FIGURES, 0),
                }
            elif _WORST[state] > _WORST[entry["state"]]:
                entry.update(state=state, token=token)
            entry["reported_at"] = max(entry["reported_at"], at)
            for name, value in zip(_SENT_FIGURES, figures, strict=True):
                entry[name] += value
        return out

    def sending_counts(self, since: datetime) -> dict[str, int]:
        """How many logins each state has in reports at or after `since` (for /metrics)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT state, COUNT(DISTINCT domain || ' ' || local) FROM sending_reports WHERE reported_at >= ?"
                " GROUP BY state",
                (since.isoformat(),),
            ).fetchall()
        return {state: int(count) for state, count in rows}

    # --- DNS checks -----------------------------------------------------------------------------

    def record_dns_check(self, domain: str, ok: bool, at: datetime) -> bool | None:
        """Keep `domain`'s newest check; returns the verdict of the check before it (None: first)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute("SELECT ok FROM dns_checks WHERE domain = ?", (domain,)).fetchone()
                self._conn.execute(
                    "INSERT OR REPLACE INTO dns_checks (domain, ok, checked_at, checked_unix) VALUES (?, ?, ?, ?)",
                    (domain, int(ok), at.isoformat(), int(at.timestamp())),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return None if row is None else bool(row[0])

    def dns_status(self, domains: list[str]) -> dict[str, dict[str, Any]]:
        """{domain: {"ok", "checked_at"}} for the given domains that were checked."""
        names = sorted(set(domains))
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            for i in range(0, len(names), 500):
                chunk = names[i : i + 500]
                rows = self._conn.execute(
                    f"SELECT domain, ok, checked_at FROM dns_checks WHERE domain IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                out.update({d: {"ok": bool(ok), "checked_at": at} for d, ok, at in rows})
        return out

    def last_dns_check(self, domain: str) -> int | None:
        """Unix seconds of `domain`'s last check, or None."""
        with self._lock:
            row = self._conn.execute("SELECT checked_unix FROM dns_checks WHERE domain = ?", (domain,)).fetchone()
        return None if row is None else int(row[0])

    def dns_checked_since(self, unix: int) -> set[str]:
        """The domains whose last check was at or after `unix` (seconds)."""
        with self._lock:
            rows = self._conn.execute("SELECT domain FROM dns_checks WHERE checked_unix >= ?", (unix,)).fetchall()
        return {r[0] for r in rows}

    # --- DKIM public keys -----------------------------------------------------------------------

    def record_dkim_keys(self, node: str, keys: list[tuple[str, str, str, int]], at: datetime) -> None:
        """Replace node `node`'s `(selector, public_key, state, created_at)` rows with what it reported."""
        stamp = at.isoformat()
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.execute("DELETE FROM dkim_keys WHERE node = ?", (node,))
                self._conn.executemany(
                    "INSERT INTO dkim_keys (node, selector, public_key, state, created_at, reported_at) VALUES (?, ?, ?, ?, ?, ?)",
                    [(node, sel, key, state, created, stamp) for sel, key, state, created in keys],
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def dkim_keys(self) -> list[dict[str, Any]]:
        """Every node's reported DKIM keys, sorted by node and selector."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT node, selector, public_key, state, created_at, reported_at FROM dkim_keys ORDER BY node, selector"
            ).fetchall()
        return [
            {"node": r[0], "selector": r[1], "public_key": r[2], "state": r[3], "created_at": r[4], "reported_at": r[5]}
            for r in rows
        ]

    # --- app password use ------------------------------------------------------------------------

    def record_app_uses(self, node: str, rows: list[tuple[str, str, str, str, str]]) -> None:
        """Store `(domain, local, name, created_at, used_at)` rows a node saw; the latest use wins."""
        if not rows:
            return
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany(
                    "INSERT INTO app_password_use (domain, local, name, created_at, last_used_at, node)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(domain, local, name, created_at) DO UPDATE SET"
                    " last_used_at=excluded.last_used_at, node=excluded.node"
                    " WHERE excluded.last_used_at > app_password_use.last_used_at",
                    [(d, lp, n, c, u, node) for d, lp, n, c, u in rows],
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def app_password_uses(self, domain: str, local: str) -> dict[tuple[str, str], str]:
        """{(name, created_at): last_used_at} of one mailbox's app passwords."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT name, created_at, last_used_at FROM app_password_use WHERE domain = ? AND local = ?",
                (domain, local),
            ).fetchall()
        return {(r[0], r[1]): r[2] for r in rows}

    def node_status(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT last_sync_at, applied_commit, status, error, statement_issued_at, last_error, last_error_at,"
                " replication, spam_filter, postscreen FROM node_status WHERE name = ?",
                (name,),
            ).fetchone()
        if row is None:
            return None
        return {
            "last_sync_at": row[0],
            "applied_commit": row[1],
            "status": row[2],
            "error": row[3],
            "statement_issued_at": row[4],
            "last_error": row[5],
            "last_error_at": row[6],
            "replication": _replication(row[7]),
            "spam_filter": _json_object(row[8]),
            "postscreen": _json_object(row[9]),
        }
