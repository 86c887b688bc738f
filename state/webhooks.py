"""Webhooks: who gets which events, and the outbox of deliveries, in the server's local database.

    Webhooks(path)        add / list / remove (the add-webhook, list-webhooks, remove-webhook
                          operations), enqueue(events) into the outbox, the outbox for the
                          dispatcher (state/delivery.py), and the small state events.py keeps
    check_url(url, ...)   the URL rule: https to a public address, unless the server runs with
                          MAILSTATE_WEBHOOK_ALLOW_PRIVATE=1 (http and private/loopback addresses too)
    sign(...)             Standard Webhooks: `v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`,
                          the key being the base64 after the secret's `whsec_`

Never in git: webhooks are the server's, like its tokens. The secret must be usable for HMAC,
so it is kept as it is (not hashed) in `mailstate.db` (the data dir is 0700, the database
0600); it is answered once by add-webhook and never listed, logged or put in an error. A
project token's webhook gets its project's events only; an admin's gets every project's and
the platform's (node.*).

The outbox is a table: an event is one row per webhook that wants it, written in one
transaction (a crash loses none and never half of one), kept until a 2xx answer or 24 hours
(state/delivery.py retries with backoff), so deliveries survive a restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import socket
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailstate.state.errors import Conflict, InvalidInput
from mailstate.state.models import ADMIN_EVENTS, MAX_WEBHOOK_URL

ENV_ALLOW_PRIVATE = "MAILSTATE_WEBHOOK_ALLOW_PRIVATE"
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
MAX_PER_PROJECT = 20
MAX_ADMIN = 50
HOOKS_TTL = 2.0  # seconds a process trusts its copy of the webhook list
_HOST = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY,
    project_id INTEGER,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at TEXT NOT NULL,
    last_success_at TEXT,
    last_failure_at TEXT,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS webhook_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    body BLOB NOT NULL,
    created_unix REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_unix REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox (next_unix);
CREATE INDEX IF NOT EXISTS webhook_outbox_hook ON webhook_outbox (webhook_id);
-- What the event sources remember between runs (state/events.py): the last commit turned into
-- events, each node's stale flag, each mailbox's quota level (0, 80, 100).
CREATE TABLE IF NOT EXISTS event_state (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quota_levels (
    domain TEXT NOT NULL,
    local TEXT NOT NULL,
    mailbox_id TEXT NOT NULL,
    level INTEGER NOT NULL,
    PRIMARY KEY (domain, local, mailbox_id)
) WITHOUT ROWID;
"""


def allow_private(env: dict[str, str] | None = None) -> bool:
    """MAILSTATE_WEBHOOK_ALLOW_PRIVATE=1: http and private or loopback receivers are allowed."""
    return (os.environ if env is None else env).get(ENV_ALLOW_PRIVATE, "") == "1"


# --- the URL rule ---------------------------------------------------------------------------------


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A globally routable unicast address (not loopback, private, link-local, CGNAT, documentation, ...)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class Target:
    """Where a URL sends: scheme, host (a name or an IP literal), port."""

    scheme: str
    host: str
    port: int
    ip_literal: bool


def parse_url(url: str, *, private_ok: bool) -> Target:
    """The URL's target, or InvalidInput(invalid_webhook_url / webhook_url_not_public). No DNS lookup."""
    bad = InvalidInput(
        "url must be an https:// URL with a host name or IP address (no user:password@, no spaces).",
        code="invalid_webhook_url",
        field="url",
    )
    if not isinstance(url, str) or len(url) > MAX_WEBHOOK_URL or not url.isascii() or not url.isprintable():
        raise bad
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError:
        raise bad from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or not host or "@" in parts.netloc or " " in url:
        raise bad
    if scheme == "http" and not private_ok:
        raise InvalidInput(
            f"url must be https (plain http only on a server that sets {ENV_ALLOW_PRIVATE}=1).",
            code="invalid_webhook_url",
            field="url",
        )
    host = host.lower()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is None and not _HOST.fullmatch(host.rstrip(".")):
        raise bad
    if ip is not None and not private_ok and not is_public(ip):
        raise not_public(host)
    if ip is None and not private_ok and (host.rstrip(".") == "localhost" or host.endswith(".localhost")):
        raise not_public(host)
    return Target(scheme, host, port or (443 if scheme == "https" else 80), ip is not None)


def not_public(host: str) -> InvalidInput:
    return InvalidInput(
        f"{host[:100]} is not a public address: webhooks go to public https receivers unless the server runs with "
        f"{ENV_ALLOW_PRIVATE}=1.",
        code="webhook_url_not_public",
        field="url",
    )


Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    """The addresses of `host` (an IP literal is itself); [] when it does not resolve now."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_url(url: str, *, private_ok: bool, resolver: Resolver = resolve) -> Target:
    """The URL rule at add-webhook: its syntax, and every address its host resolves to now is
    public (a name that does not resolve yet is taken: each delivery checks again)."""
    target = parse_url(url, private_ok=private_ok)
    if not private_ok and not target.ip_literal:
        for text in resolver(target.host, target.port):
            if not is_public(ipaddress.ip_address(text.split("%", 1)[0])):
                raise not_public(target.host)
    return target


# --- secrets and signatures ----------------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_` secret; InvalidInput(invalid_webhook_secret) for a bad one."""
    bad = InvalidInput(
        "secret must be whsec_ followed by the base64 of 24-64 random bytes.",
        code="invalid_webhook_secret",
        field="secret",
    )
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise bad
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (ValueError, TypeError):
        raise bad from None
    if not 24 <= len(key) <= 64:
        raise bad
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value (Standard Webhooks, v1: HMAC-SHA256, base64)."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, msg_id: str, timestamp: str, body: bytes, header: str) -> bool:
    """A receiver's check (used by the tests and the bench): one `v1,` signature matches, in constant time."""
    expected = sign(secret, msg_id, int(timestamp), body)
    return any(hmac.compare_digest(expected, given) for given in header.split(" "))


# --- events and the outbox -------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One event: its type, the project it concerns (None: the platform's), its data, when."""

    type: str
    project_id: int | None
    data: dict[str, Any]
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def body(self) -> bytes:
        """The JSON every receiver gets (Standard Webhooks' suggested envelope)."""
        stamp = self.at.astimezone(UTC).isoformat().replace("+00:00", "Z")
        payload = {"type": self.type, "timestamp": stamp, "data": {**self.data, "project_id": self.project_id}}
        return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class Hook:
    id: str
    project_id: int | None
    url: str
    events: frozenset[str]
    created_at: datetime

    def wants(self, event: Event) -> bool:
        if event.type not in self.events or event.at < self.created_at:
            return False  # not its type, or it happened before the webhook was made
        if self.project_id is None:
            return True  # an admin's: every project, and the platform's events
        return event.type not in ADMIN_EVENTS and event.project_id == self.project_id


@dataclass(frozen=True)
class Delivery:
    """One outbox row the dispatcher tries."""

    seq: int
    webhook_id: str
    url: str
    secret: str
    msg_id: str
    body: bytes
    created_unix: float
    attempts: int


class Webhooks:
    """The registry and the outbox (see the module docstring). Thread-safe; its own connection
    to `mailstate.db` (WAL), so token lookups never wait behind a delivery's bookkeeping."""

    def __init__(self, path: Path | str, *, private_ok: bool | None = None, resolver: Resolver = resolve) -> None:
        self.path = Path(path)
        self.private_ok = allow_private() if private_ok is None else private_ok
        self.resolver = resolver
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(SCHEMA)
        self._hooks: list[Hook] | None = None
        self._hooks_at = 0.0
        # Told after rows were added to the outbox (the dispatcher wakes up).
        self.on_enqueue: Callable[[], None] = lambda: None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- the registry (the operations) --------------------------------------------------------

    def add_hook(
        self, project_id: int | None, url: str, events: list[str], secret: str | None, now: datetime
    ) -> dict[str, Any]:
        check_url(url, private_ok=self.private_ok, resolver=self.resolver)
        if secret is not None:
            secret_key(secret)
        secret = secret or new_secret()
        hook_id = "wh_" + secrets.token_hex(8)
        # To the microsecond: an event of a write made just before is not this webhook's.
        created = max(now, datetime.now(UTC)).astimezone(UTC).isoformat()
        cap = MAX_ADMIN if project_id is None else MAX_PER_PROJECT
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                count = self._conn.execute(
                    "SELECT COUNT(*) FROM webhooks WHERE project_id IS ?", (project_id,)
                ).fetchone()[0]
                if count >= cap:
                    raise Conflict(
                        f"There are {count} webhooks already, the most one {'admin' if project_id is None else 'project'} "
                        "may have; remove one first.",
                        code="too_many_webhooks",
                    )
                self._conn.execute(
                    "INSERT INTO webhooks (id, project_id, url, events, secret, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (hook_id, project_id, url, json.dumps(sorted(events)), secret, created),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._hooks = None
        return {
            "id": hook_id,
            "url": url,
            "events": sorted(events),
            "project_id": project_id,
            "created_at": created,
            "secret": secret,
        }

    def list_hooks(self, project_id: int | None) -> list[dict[str, Any]]:
        """A project's webhooks, or (None) every webhook for an admin; never the secrets."""
        query = (
            "SELECT w.id, w.project_id, w.url, w.events, w.created_at, w.last_success_at, w.last_failure_at,"
            " w.last_error, (SELECT COUNT(*) FROM webhook_outbox o WHERE o.webhook_id = w.id) FROM webhooks w"
        )
        with self._lock:
            if project_id is None:
                rows = self._conn.execute(query + " ORDER BY w.created_at, w.id").fetchall()
            else:
                rows = self._conn.execute(
                    query + " WHERE w.project_id = ? ORDER BY w.created_at, w.id", (project_id,)
                ).fetchall()
        return [
            {
                "id": r[0],
                "project_id": r[1],
                "url": r[2],
                "events": json.loads(r[3]),
                "created_at": r[4],
                "last_success_at": r[5],
                "last_failure_at": r[6],
                "last_error": r[7],
                "pending": int(r[8]),
            }
            for r in rows
        ]

    def remove_hook(self, webhook_id: str, project_id: int | None) -> bool:
        """Remove a webhook (an admin any, a project its own) and its pending deliveries."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                if project_id is None:
                    gone = self._conn.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,)).rowcount
                else:
                    gone = self._conn.execute(
                        "DELETE FROM webhooks WHERE id = ? AND project_id = ?", (webhook_id, project_id)
                    ).rowcount
                if gone:
                    self._conn.execute("DELETE FROM webhook_outbox WHERE webhook_id = ?", (webhook_id,))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._hooks = None
        return bool(gone)

    def hooks(self) -> list[Hook]:
        """Every webhook; read again after this process changed one, or every HOOKS_TTL seconds
        (another process, `mailstate call add-webhook`, may have)."""
        with self._lock:
            now = time.monotonic()
            if self._hooks is None or now - self._hooks_at > HOOKS_TTL:
                rows = self._conn.execute("SELECT id, project_id, url, events, created_at FROM webhooks").fetchall()
                self._hooks = [
                    Hook(r[0], r[1], r[2], frozenset(json.loads(r[3])), datetime.fromisoformat(r[4])) for r in rows
                ]
                self._hooks_at = now
            return self._hooks

    # --- the outbox ---------------------------------------------------------------------------

    def enqueue(
        self,
        events: Sequence[Event],
        state: dict[str, str] | None = None,
        levels: Sequence[tuple[str, str, str, int]] = (),
        now: float | None = None,
    ) -> int:
        """One outbox row per (event, webhook that wants it), with `state` (event_state keys) and
        `levels` (quota_levels rows) in the same transaction. Returns the rows added."""
        hooks = self.hooks()
        rows = []
        at = time.time() if now is None else now
        for event in events:
            wanting = [h for h in hooks if h.wants(event)]
            if not wanting:
                continue
            body, msg_id = event.body(), "msg_" + secrets.token_urlsafe(16)
            rows += [(h.id, msg_id, body, at, at) for h in wanting]
        if not rows and not state and not levels:
            return 0
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT INTO webhook_outbox (webhook_id, msg_id, body, created_unix, next_unix) VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
                if state:
                    self._conn.executemany(
                        "INSERT OR REPLACE INTO event_state (key, value) VALUES (?, ?)", list(state.items())
                    )
                if levels:
                    self._conn.executemany(
                        "INSERT OR REPLACE INTO quota_levels (domain, local, mailbox_id, level) VALUES (?, ?, ?, ?)",
                        list(levels),
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        if rows:
            self.on_enqueue()
        return len(rows)

    def due(self, now: float, limit: int, skip: Iterable[int] = ()) -> list[Delivery]:
        """Outbox rows whose next try is due, oldest first (not those in `skip`, being tried)."""
        skipped = set(skip)
        with self._lock:
            rows = self._conn.execute(
                "SELECT o.seq, o.webhook_id, w.url, w.secret, o.msg_id, o.body, o.created_unix, o.attempts"
                " FROM webhook_outbox o JOIN webhooks w ON w.id = o.webhook_id WHERE o.next_unix <= ?"
                " ORDER BY o.next_unix, o.seq LIMIT ?",
                (now, limit + len(skipped)),
            ).fetchall()
        return [Delivery(*r) for r in rows if r[0] not in skipped][:limit]

    def next_due(self) -> float | None:
        with self._lock:
            row = self._conn.execute("SELECT MIN(next_unix) FROM webhook_outbox").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def delivered(self, delivery: Delivery, at: datetime) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("DELETE FROM webhook_outbox WHERE seq = ?", (delivery.seq,))
                self._conn.execute(
                    "UPDATE webhooks SET last_success_at = ? WHERE id = ?", (at.isoformat(), delivery.webhook_id)
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def failed(self, delivery: Delivery, error: str, at: datetime, retry_at: float | None) -> None:
        """A try failed: try again at `retry_at`, or (None) give up and drop the row."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                if retry_at is None:
                    self._conn.execute("DELETE FROM webhook_outbox WHERE seq = ?", (delivery.seq,))
                else:
                    self._conn.execute(
                        "UPDATE webhook_outbox SET attempts = attempts + 1, next_unix = ? WHERE seq = ?",
                        (retry_at, delivery.seq),
                    )
                self._conn.execute(
                    "UPDATE webhooks SET last_failure_at = ?, last_error = ? WHERE id = ?",
                    (at.isoformat(), error[:300], delivery.webhook_id),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def backlog(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM webhook_outbox").fetchone()[0])

    # --- what the event sources remember -----------------------------------------------------------

    def get_state(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM event_state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def count_state(self, prefix: str, value: str) -> int:
        """How many event_state keys under `prefix` hold `value` (e.g. suspended mailboxes)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT COUNT(*) FROM event_state WHERE key >= ? AND key < ? AND value = ?",
                (prefix, prefix + "\uffff", value),
            ).fetchone()
        return int(row[0])

    def quota_levels(self, domains: Iterable[str]) -> dict[tuple[str, str, str], int]:
        """The non-zero quota levels kept for mailboxes of `domains`."""
        names = sorted(set(domains))
        out: dict[tuple[str, str, str], int] = {}
        with self._lock:
            for i in range(0, len(names), 500):
                chunk = names[i : i + 500]
                rows = self._conn.execute(
                    f"SELECT domain, local, mailbox_id, level FROM quota_levels WHERE level > 0 AND domain IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                out.update({(d, lp, i): int(level) for d, lp, i, level in rows})
        return out
