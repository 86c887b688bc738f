"""Node sync: authenticating a node by its sync key, and recording what it reports.

A node proves who it is with its name and sync key (HTTP Basic on the wire). nodes.yaml
holds only the key's SHA-256, compared here in constant time. A node with an `ip_address`
on record is refused from any other address. Reports land in the server's local database,
never in git: a report every minute would drown the audit log.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from mailstate.state.errors import Forbidden, InvalidInput, Unauthenticated
from mailstate.state.models import Node, PostscreenReport, SpamFilterReport, parse
from mailstate.state.sending import MAX_SENDING_ENTRIES, SendingChange, SendingEntry, report_rows
from mailstate.state.snapshot import Snapshot
from mailstate.state.validate import MAILBOX_ID, normalize_certificate

MAX_ERROR_CHARS = 2000
MAX_KEY_CHARS = 512
MAX_USAGE_ENTRIES = 200_000
MAX_USED_BYTES = 2**53  # JSON-safe integers; far above any quota (1 TiB)
USAGE_EMAIL = r"^[a-z0-9][a-z0-9._+-]{0,63}@[a-z0-9][a-z0-9.-]{0,252}$"
_NO_SUCH_NODE = hashlib.sha256(b"no such node").hexdigest()
# list-nodes shows a node `stale` when its last report is older than this (seconds;
# $MAILSTATE_NODE_STALE_AFTER): a node reports every tick, at least every [agent] interval
# (60 s), so ten minutes of silence means it is not ticking or cannot reach the server. The
# same default as the node's own [freshness] max_staleness.
REPORT_STALE_AFTER_S = 600


def report_stale_after() -> int:
    """Seconds after which a node's silence makes it `stale` in list-nodes (see REPORT_STALE_AFTER_S)."""
    try:
        value = int(os.environ.get("MAILSTATE_NODE_STALE_AFTER", REPORT_STALE_AFTER_S))
    except ValueError:
        return REPORT_STALE_AFTER_S
    return value if 1 <= value <= 10 * 365 * 86400 else REPORT_STALE_AFTER_S


def _commit(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _clip(value: object) -> object:
    # A node's error text comes from git or the shell; a long one is cut, not refused, so that
    # the report (and the status it carries) still gets through.
    if isinstance(value, str) and len(value) > MAX_ERROR_CHARS:
        return value[: MAX_ERROR_CHARS - 3] + "..."
    return value


class UsageEntry(BaseModel):
    """One mailbox's measured size, as a node reports it (docs/api.md, "Usage figures"). Strict: a number
    sent as a string is a node bug, refused rather than guessed at."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    # The canonical address as the release's files spell it (lowercase, punycode): checked by
    # shape here and matched against the state in usage_rows. (Full normalisation of 100k
    # addresses costs seconds a report; a lookup in the snapshot proves more, for less.)
    email: str = Field(
        pattern=USAGE_EMAIL,
        max_length=320,
        description="The mailbox's address, `<local>@<domain>` as in the rendered files.",
    )
    id: str = Field(pattern=MAILBOX_ID.pattern, description="The mailbox id (the `~<id>` of its home).")
    used_bytes: int = Field(ge=0, le=MAX_USED_BYTES, description="Bytes of mail in the Maildir.")
    messages: int = Field(ge=0, le=MAX_USED_BYTES, description="Number of messages in the Maildir.")


DKIM_SELECTOR = r"^ms[12]-[a-z0-9](?:[a-z0-9-]{0,55}[a-z0-9])?$"
# RSA 1024-4096 as base64 DER SubjectPublicKeyInfo: 216-736 characters; a little room either side.
DKIM_PUBLIC_KEY = r"^[A-Za-z0-9+/]{200,1000}={0,2}$"
MAX_DKIM_KEYS = 2  # two selectors per node (pi-pull/pipull/dkim.py)


class DkimKeyEntry(BaseModel):
    """One of the node's DKIM public keys (pi-pull/pipull/dkim.py). Only the public half ever
    leaves the node; the server keeps it in its local database for `dns-records`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    selector: str = Field(
        pattern=DKIM_SELECTOR, description="`ms1-<node>` or `ms2-<node>`: the node's two alternating selectors."
    )
    public_key: str = Field(
        pattern=DKIM_PUBLIC_KEY, description="The `p=` value: base64 of the DER SubjectPublicKeyInfo of an RSA key."
    )
    state: Literal["pending", "active", "retired"] = Field(
        description="pending: published, not signing yet; active: signing; retired: the previous key, published until the next rotation."
    )
    created_at: int = Field(ge=0, le=2**40, description="When the node made the key (unix seconds).")


MAX_APP_USES = 10_000


class AppPasswordUse(BaseModel):
    """An app password a node saw log in (pi-pull/pipull/apppass.py): the mailbox, the passdb slot
    it sits in on the nodes, and when (the server maps the slot to the password holding it)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    email: str = Field(pattern=USAGE_EMAIL, max_length=320, description="The mailbox address (the login).")
    slot: int = Field(ge=0, le=99, description="The app password's slot (its passdb on the nodes).")
    used_at: int = Field(ge=0, le=2**40, description="When the node saw the login (unix seconds, within a tick).")


def _certificate(value: object) -> object:
    return None if value is None else normalize_certificate(value)


class MoveReport(BaseModel):
    """One step of a move-domain, as the node that did it reports it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    domain: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{0,252}$", description="The domain (as in the rendered files).")
    step: Literal["copied", "drained"]


class ReplicationReport(BaseModel):
    """How a home's replication with one peer stands (pi-pull/pipull/replication.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    peer: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="The replica node.")
    domains: int = Field(ge=0, le=10_000_000, description="Domains this node is the home and the peer the replica of.")
    lag_s: float | None = Field(
        default=None,
        ge=0,
        le=2**40,
        description="Seconds the oldest change not yet on the peer has waited (0: in sync; null before a first sync).",
    )
    last_sync_at: int | None = Field(
        default=None, ge=0, le=2**40, description="When a sync pass with the peer last succeeded (unix seconds)."
    )
    error: Annotated[str | None, BeforeValidator(_clip)] = Field(
        default=None, max_length=MAX_ERROR_CHARS, description="The last sync's error, if it failed."
    )


class NodeReport(BaseModel):
    """The body of `POST /v1/nodes/report` (credentials aside)."""

    model_config = ConfigDict(extra="forbid")

    applied_commit: Annotated[str | None, BeforeValidator(_commit)] = Field(
        default=None,
        pattern=r"^[0-9a-f]{40}$",
        description="The commit the node serves now (40 hex digits), or null before its first release.",
    )
    status: Literal["ok", "error", "refused", "stale"] = Field(
        description="Outcome of the node's last pull; `stale`: its newest verified accepted-head statement is older than its max_staleness (it keeps serving)."
    )
    error: Annotated[str | None, BeforeValidator(_clip)] = Field(
        default=None,
        max_length=MAX_ERROR_CHARS,
        description=f"What went wrong, if anything (cut at {MAX_ERROR_CHARS} characters).",
    )
    statement_issued_at: int | None = Field(
        default=None,
        ge=0,
        le=2**40,
        strict=True,
        description="Issued-At (unix seconds) of the newest verified accepted-head statement the node holds, or null before its first.",
    )
    usage: list[UsageEntry] | None = Field(
        default=None,
        max_length=MAX_USAGE_ENTRIES,
        description="Optional: each mailbox's measured size, sent every usage_interval (not every pull). Stored on the server, never in git.",
    )
    dkim_keys: list[DkimKeyEntry] | None = Field(
        default=None,
        max_length=MAX_DKIM_KEYS,
        description="Optional: the node's DKIM public keys (at most one per selector). Stored on the server (never in git); dns-records lists them.",
    )
    tls_certificate: Annotated[str | None, BeforeValidator(_certificate)] = Field(
        default=None,
        description="Optional: the certificate (PEM) the node's Postfix and Dovecot present. When it differs from the one "
        "nodes.yaml holds, the server commits it: the other nodes verify this node against it (docs/fleet.md).",
    )
    moves: list[MoveReport] | None = Field(
        default=None,
        max_length=1000,
        description="Optional: move-domain progress: `copied` (this node, the domain's moving_to, copied every mailbox; "
        "the server then switches the home) or `drained` (this node, the previous home, synced what it still held to the "
        "new home).",
    )

    replication: list[ReplicationReport] | None = Field(
        default=None,
        max_length=1000,
        description="Optional: per replica this node keeps in sync (it is the home), the lag and the last sync. Stored "
        "on the server, never in git; list-nodes shows it as `replication`.",
    )
    app_passwords_used: list[AppPasswordUse] | None = Field(
        default=None,
        max_length=MAX_APP_USES,
        description="Optional: app passwords that logged in since the last report. Stored on the server (never in "
        "git); list-app-passwords shows them as last_used_at.",
    )
    spam_filter: SpamFilterReport | None = Field(
        default=None,
        description="Optional: the node's inbound filter (rspamd): whether it answers, and its counters. list-nodes "
        "and /metrics show it.",
    )
    postscreen: PostscreenReport | None = Field(
        default=None,
        description="Optional: port 25's postscreen, the clients it refused (counted from Postfix's log). list-nodes "
        "and /metrics show it.",
    )
    sending: list[SendingEntry] | None = Field(
        default=None,
        max_length=MAX_SENDING_ENTRIES,
        description="Optional: what the node's policy service counted per login (the logins whose figures changed "
        "since its last report). Stored on the server, never in git; list-users shows it.",
    )

    @model_validator(mode="after")
    def _one_key_per_selector(self) -> NodeReport:
        keys = self.dkim_keys or []
        if len({k.selector for k in keys}) != len(keys):
            raise InvalidInput("dkim_keys lists a selector twice.", code="invalid_dkim_key", field="dkim_keys")
        if sum(1 for k in keys if k.state == "active") > 1:
            raise InvalidInput("dkim_keys has more than one active key.", code="invalid_dkim_key", field="dkim_keys")
        return self


class StatusSink(Protocol):
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
    ) -> None: ...

    def record_usage(self, node: str, rows: list[tuple[str, str, str, int, int]], at: datetime) -> None: ...

    def record_dkim_keys(self, node: str, keys: list[tuple[str, str, str, int]], at: datetime) -> None: ...

    def record_app_uses(self, node: str, rows: list[tuple[str, str, str, str, str]]) -> None: ...

    def record_sending(self, node: str, rows: list[tuple[Any, ...]], at: datetime) -> list[SendingChange]: ...


class ReportListener(Protocol):
    """Who hears what a report changed (the server's webhooks, state.webhooks.Hub)."""

    def usage_reported(self, snapshot: Snapshot, rows: list[tuple[str, str, str, int, int]], at: datetime) -> None: ...

    def sending_changed(self, node: str, changes: list[SendingChange], at: datetime) -> None: ...


def normalize_addr(addr: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer address as an ip_address; an IPv4-mapped IPv6 address becomes its IPv4 form."""
    if not addr:
        return None
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def authenticate_node(snapshot: Snapshot, name: object, sync_key: object, remote_addr: str | None) -> Node:
    """The node `name` if `sync_key` is its key and it may connect from `remote_addr`.

    Unknown node or wrong key: Unauthenticated (the two are indistinguishable, and the
    comparison takes the same time either way). Right key from an address other than the
    node's `ip_address`: Forbidden(ip_not_allowed).
    """
    node = snapshot.nodes.nodes.get(name) if isinstance(name, str) else None
    expected = node.sync_key_sha256 if node is not None else _NO_SUCH_NODE
    given = (
        hashlib.sha256(sync_key.encode("utf-8", "replace")).hexdigest()
        if isinstance(sync_key, str) and len(sync_key) <= MAX_KEY_CHARS
        else ""
    )
    if not hmac.compare_digest(expected, given) or node is None:
        raise Unauthenticated("A valid node name and sync key are required.", code="unauthenticated")
    if node.ip_address is not None:
        peer = normalize_addr(remote_addr)
        if peer is None or peer != normalize_addr(node.ip_address):
            where = f" from {peer}" if peer is not None else " from an unknown address"
            raise Forbidden(f"Node {name} may not connect{where}.", code="ip_not_allowed")
    return node


def parse_report(body: Any) -> NodeReport:
    """Validate a report body into NodeReport, raising InvalidInput."""
    if isinstance(body, dict) and "dkim_keys" in body:
        try:
            NodeReport.model_validate({"status": "ok", "dkim_keys": body["dkim_keys"]})
        except ValidationError as exc:
            # Name the entry and the key at fault (the generic message names only the field).
            err = exc.errors(include_input=False, include_url=False)[0]
            where = ".".join(str(p) for p in err.get("loc", ()))
            raise InvalidInput(
                f"Invalid {where}: {err.get('msg', 'invalid value')}.", code="invalid_dkim_key", field="dkim_keys"
            ) from None
    return parse(NodeReport, body)


def record_report(
    db: StatusSink,
    snapshot: Snapshot,
    name: str,
    body: Any,
    remote_addr: str | None,
    now: datetime,
    listener: ReportListener | None = None,
) -> NodeReport:
    """Validate a report from the (already authenticated) node `name` and store it as its last sync;
    `listener` hears the usage figures and the sending states that changed."""
    if name not in snapshot.nodes.nodes:
        raise Unauthenticated("A valid node name and sync key are required.", code="unauthenticated")
    report = parse_report(body)
    for key in report.dkim_keys or []:
        # A node publishes under its own two selectors only: no node can take over another's DNS names.
        if key.selector not in (f"ms1-{name}", f"ms2-{name}"):
            why = f"DKIM selector {key.selector} is not one of node {name}'s (ms1-{name}, ms2-{name})."
            raise InvalidInput(why, code="invalid_dkim_key", field="dkim_keys")
    peer = normalize_addr(remote_addr)
    db.record_node_status(
        name,
        applied_commit=report.applied_commit,
        status=report.status,
        error=report.error,
        remote_addr=str(peer) if peer is not None else None,
        at=now,
        statement_issued_at=report.statement_issued_at,
        replication=None
        if report.replication is None
        else json.dumps([entry.model_dump() for entry in report.replication], sort_keys=True),
        spam_filter=report.spam_filter.model_dump_json() if report.spam_filter is not None else None,
        postscreen=report.postscreen.model_dump_json() if report.postscreen is not None else None,
    )
    if report.usage:
        rows = usage_rows(snapshot, report.usage)
        db.record_usage(name, rows, now)
        if listener is not None:
            listener.usage_reported(snapshot, rows, now)
    if report.sending:
        changes = db.record_sending(name, report_rows(snapshot.domains, report.sending), now)
        if listener is not None and changes:
            listener.sending_changed(name, changes, now)
    if report.dkim_keys is not None:
        # Every report carries the node's whole set: what it no longer lists is no longer published.
        db.record_dkim_keys(name, [(k.selector, k.public_key, k.state, k.created_at) for k in report.dkim_keys], now)
    if report.app_passwords_used:
        db.record_app_uses(name, app_use_rows(snapshot, report.app_passwords_used, now))
    return report


def app_use_rows(snapshot: Snapshot, uses: list[AppPasswordUse], now: datetime) -> list[tuple[str, str, str, str, str]]:
    """`(domain, local, name, created_at, used_at)` for the uses that name an app password of the
    current state: the one in that slot, made before the use (a password made since, in a freed
    slot, never inherits the old one's use). A time in the future is the server's now."""
    rows = []
    for use in uses:
        local, _, domain = use.email.partition("@")
        dom = snapshot.domains.get(domain)
        box = dom.mailboxes.get(local) if dom is not None else None
        for name, entry in (box.app_passwords or {}).items() if box is not None else ():
            used = min(datetime.fromtimestamp(use.used_at, UTC), now)
            if entry.slot == use.slot and used >= entry.created_at:
                rows.append((domain, local, name, entry.created_at.isoformat(), used.isoformat()))
    return rows


def usage_rows(snapshot: Snapshot, usage: list[UsageEntry]) -> list[tuple[str, str, str, int, int]]:
    """The entries that name a mailbox of the current state (address AND id), as db rows.

    Anything else (a mailbox deleted since the node measured, a stray Maildir) is dropped, so
    the table only ever holds figures of mailbox identities the state knows."""
    rows = []
    for entry in usage:
        local, _, domain = entry.email.partition("@")
        dom = snapshot.domains.get(domain)
        box = dom.mailboxes.get(local) if dom is not None else None
        if box is not None and box.id == entry.id:
            rows.append((domain, local, entry.id, entry.used_bytes, entry.messages))
    return rows
