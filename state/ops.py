"""The operations: (snapshot, actor, request) → Outcome, or an error from state.errors.

Every rule of the API lives here and nowhere else, but the one across domains (alias chains,
alias_of targets): the store checks every write's change with state.sync.change_problems, the
function that checks commits from elsewhere, so a write and an incoming commit get one verdict.
Operations are pure: they read the snapshot and return the change; the store commits it. The
work that must run outside the write lock (bcrypt, key generation) happens in an operation's
`prepare` step.

`OPERATIONS` is the registry the edges are generated from: each entry names its spec
endpoint, its MCP tool, its HTTP method, its request model and whether it needs an admin.
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import bcrypt

from mailstate.state import aliases as al
from mailstate.state import autoconfig as ac
from mailstate.state import limits as lim
from mailstate.state import models as m
from mailstate.state import owners as ow
from mailstate.state import paging, placement, spam
from mailstate.state import sending as snd
from mailstate.state import validate as v
from mailstate.state.dns import effective_dns, records_for
from mailstate.state.errors import Conflict, Forbidden, InvalidInput, NotFound, Unavailable
from mailstate.state.nodes import report_stale_after
from mailstate.state.snapshot import Actor, Change, Outcome, Snapshot

SYNC_KEY_PREFIX = "mss_"
NodeStatusLookup = Callable[[str], "dict[str, Any] | None"]
# domain names → {domain: {(local, mailbox id): usage row}} (state.localdb.LocalDB.usage_for).
UsageLookup = Callable[[list[str]], "dict[str, dict[tuple[str, str], dict[str, Any]]]"]
# () → every node's reported DKIM keys (state.localdb.LocalDB.dkim_keys).
DkimLookup = Callable[[], "list[dict[str, Any]]"]
# (domain, local) → {(app password name, created_at ISO): last_used_at ISO} (LocalDB.app_password_uses).
AppUseLookup = Callable[[str, str], "dict[tuple[str, str], str]"]
# (domain, its dns-records) → check-dns's answer, the check recorded (state.dnscheck.DnsChecker.check).
DnsCheck = Callable[[str, "list[dict[str, Any]]"], "dict[str, Any]"]
# domain names → {domain: {"ok", "checked_at"}} of their last checks (state.localdb.LocalDB.dns_status).
DnsStatusLookup = Callable[[list[str]], "dict[str, dict[str, Any]]"]
# domain names → {domain: {local: the nodes' latest sending figures}} (state.localdb.LocalDB.sending_for).
SendingLookup = Callable[[list[str]], "dict[str, dict[str, dict[str, Any]]]"]


class WebhookRegistry(Protocol):
    """The server's webhooks (state.webhooks.Webhooks): kept in its local database, never in git."""

    def add_hook(
        self, project_id: int | None, url: str, events: list[str], secret: str | None, now: datetime
    ) -> dict[str, Any]: ...

    def list_hooks(self, project_id: int | None) -> list[dict[str, Any]]: ...

    def remove_hook(self, webhook_id: str, project_id: int | None) -> bool: ...


@dataclass(frozen=True)
class Context:
    """Everything an operation may look at besides its request."""

    state: Snapshot
    actor: Actor
    now: datetime
    node_status: NodeStatusLookup
    usage: UsageLookup | None = None
    dkim_keys: DkimLookup | None = None
    app_uses: AppUseLookup | None = None
    dns_check: DnsCheck | None = None
    dns_status: DnsStatusLookup | None = None
    sending: SendingLookup | None = None
    webhooks: WebhookRegistry | None = None


Prepared = dict[str, Any]


@dataclass(frozen=True)
class Operation:
    """One API operation, as the edges see it."""

    name: str
    request: type[m.Request]
    apply: Callable[[Context, Any, Prepared], Outcome]
    method: str = "POST"
    admin: bool = False
    write: bool = True
    in_spec: bool = True
    prepare: Callable[[Any, m.Settings], Prepared] | None = None
    summary: str = ""
    # Answered without a token (mail-client setup); the operation then sees Actor.anonymous().
    public: bool = False
    # Changes the server's local database, not the state repo (webhooks): no commit, not read-only.
    local: bool = False
    # A listing answered from the published snapshot and the local database alone, in bounded
    # time (one page): the HTTP edge runs it on its event loop. A worker thread would cost the
    # read two thread hops, each a wait for the GIL behind the writers, and a free thread, which
    # queued writers can all hold.
    inline: bool = False

    @property
    def tool_name(self) -> str:
        """The MCP tool name, as the spec's table spells it."""
        return "email_account_" + self.name.replace("-", "_")


# --- helpers -----------------------------------------------------------------------------


def hash_password(password: str, cost: int) -> str:
    """bcrypt in the `{BLF-CRYPT}` form Dovecot reads."""
    return "{BLF-CRYPT}" + bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds=cost, prefix=b"2b")).decode()


def new_sync_key() -> tuple[str, str]:
    """A fresh 256-bit sync key and its SHA-256 hex digest."""
    key = SYNC_KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hashlib.sha256(key.encode()).hexdigest()


def _require_admin(ctx: Context) -> None:
    if not ctx.actor.is_admin:
        raise Forbidden("This operation needs an admin token.", code="admin_required")


def _visible_domain(ctx: Context, name: str) -> m.DomainFile:
    """The domain if the actor may touch it. Another project's domain reads as absent."""
    dom = ctx.state.domains.get(name)
    if dom is None or (not ctx.actor.is_admin and dom.project_id != ctx.actor.project_id):
        raise NotFound(f"Domain {name} is not linked to this project.", code="domain_not_found", target=name)
    return dom


def _mail_domain(ctx: Context, name: str) -> m.DomainFile:
    dom = _visible_domain(ctx, name)
    if not dom.email_enabled:
        raise Conflict(
            f"Email is not enabled for {name}; call enable-email first.", code="email_not_enabled", target=name
        )
    return dom


def _mailbox(ctx: Context, email: str) -> tuple[m.DomainFile, str, m.Mailbox]:
    local, _, name = email.partition("@")
    dom = ctx.state.domains.get(name)
    visible = dom is not None and (ctx.actor.is_admin or dom.project_id == ctx.actor.project_id)
    box = dom.mailboxes.get(local) if dom is not None and visible else None
    if dom is None or box is None:
        raise NotFound(f"Mailbox {email} does not exist.", code="mailbox_not_found", target=email)
    return dom, local, box


def _with_mailboxes(dom: m.DomainFile, mailboxes: dict[str, m.Mailbox], **changes: Any) -> m.DomainFile:
    return dom.model_copy(update={"mailboxes": mailboxes, **changes})


def _write(
    dom: m.DomainFile | None, name: str, result: dict[str, Any], project: int | None, created: bool = False
) -> Outcome:
    return Outcome(result=result, change=Change(domains={name: dom}), target=name, project=project, created=created)


def _domain_result(dom: m.DomainFile) -> dict[str, Any]:
    return {"domain": dom.domain, "project_id": dom.project_id, "email_enabled": dom.email_enabled, "home": dom.home}


def _placed(ctx: Context, dom: m.DomainFile, node: str | None = None) -> m.DomainFile:
    """`dom` (email just enabled) with its home: `node` (an admin's choice, checked usable) or the
    addressed node with the fewest mailboxes; none in a fleet without addressed nodes."""
    if node is not None:
        placement.usable_node(ctx.state.nodes, node)
        home: str | None = node
    else:
        home = placement.choose_home(ctx.state.nodes, ctx.state.home_boxes)
    return dom.model_copy(update={"home": home, "moving_to": None, "moved_from": None})


# --- domains -----------------------------------------------------------------------------


def link_domain(ctx: Context, req: m.LinkDomainRequest, _: Prepared) -> Outcome:
    _require_admin(ctx)
    dom = ctx.state.domains.get(req.domain)
    if dom is None:
        new = m.DomainFile(domain=req.domain, project_id=req.project_id)
        return _write(new, req.domain, _domain_result(new), req.project_id, created=True)
    if dom.project_id == req.project_id:
        return Outcome(_domain_result(dom), target=req.domain, project=req.project_id)
    if dom.project_id is not None:
        raise Conflict(
            f"Domain {req.domain} is linked to another project; unlink it first.",
            code="domain_linked_elsewhere",
            target=req.domain,
        )
    new = dom.model_copy(update={"project_id": req.project_id})
    return _write(new, req.domain, _domain_result(new), req.project_id)


def unlink_domain(ctx: Context, req: m.UnlinkDomainRequest, _: Prepared) -> Outcome:
    _require_admin(ctx)
    dom = _visible_domain(ctx, req.domain)
    if dom.email_enabled:
        raise Conflict(
            f"Email is still enabled for {req.domain}; disable it first.", code="email_enabled", target=req.domain
        )
    if dom.project_id is None:
        return Outcome({"domain": req.domain, "project_id": None}, target=req.domain)
    return _write(None, req.domain, {"domain": req.domain, "project_id": None}, dom.project_id)


def enable_email(ctx: Context, req: m.EnableEmailRequest, _: Prepared) -> Outcome:
    if req.node is not None:
        _require_admin(ctx)
    dom = _visible_domain(ctx, req.domain)
    if dom.email_enabled:
        if req.node is not None and req.node != dom.home:
            raise Conflict(
                f"Email is already enabled for {req.domain} (home {dom.home}); move-domain moves it to {req.node}.",
                code="email_enabled",
                target=req.domain,
            )
        return Outcome(_domain_result(dom), target=req.domain, project=dom.project_id)
    new = _placed(ctx, dom.model_copy(update={"email_enabled": True}), req.node)
    return _write(new, req.domain, _domain_result(new), dom.project_id)


def _remove_mail(dom: m.DomainFile) -> None:
    active = dom.active_count()
    if active:
        raise Conflict(
            f"{dom.domain} still has {active} active mailbox(es); remove them first.",
            code="active_mailboxes_remain",
            target=dom.domain,
        )


def disable_email(ctx: Context, req: m.DisableEmailRequest, _: Prepared) -> Outcome:
    dom = _visible_domain(ctx, req.domain)
    if not dom.email_enabled and not dom.mailboxes:
        return Outcome(_domain_result(dom), target=req.domain, project=dom.project_id)
    _remove_mail(dom)
    _no_alias_domains_of(ctx, dom.domain)
    # Soft-deleted mailboxes go with the mail system: nothing may come back to life later.
    # So do the domain's aliases, its catch-all and its alias-domain setting.
    # The home goes too: a domain without email has no mail to hold (the nodes set the Maildirs aside).
    new = _with_mailboxes(
        dom,
        {},
        email_enabled=False,
        aliases={},
        alias_of=None,
        home=None,
        moving_to=None,
        moved_from=None,
        replica=None,
    )
    return _write(new, req.domain, _domain_result(new), dom.project_id)


def _actor_domains(ctx: Context) -> list[str]:
    """Every domain the actor may see, sorted: all for an admin, its project's for a project."""
    if ctx.actor.is_admin:
        return ctx.state.sorted_domains  # sorted once per snapshot: 200k names take ~0.1 s
    return sorted(ctx.state.by_project.get(ctx.actor.project_id or 0, frozenset()))


def _listed_domains(ctx: Context, domain: str | None, page: paging.Page) -> list[str]:
    """The sorted domain names a listing walks: the one `domain` (checked visible) or every
    domain of the actor, from the cursor's domain on (its first entries may still be skipped)."""
    names = [_visible_domain(ctx, domain).domain] if domain is not None else _actor_domains(ctx)
    return names[bisect_left(names, page.after[0]) :] if page.after else names


def _entries_after(page: paging.Page, keys: list[str], name: str) -> list[str]:
    """`keys` (sorted) of domain `name` that come after the cursor's (domain, key)."""
    if page.after and page.after[0] == name:
        return keys[bisect_right(keys, page.after[1]) :]
    return keys


def list_domains(ctx: Context, req: m.ListDomainsRequest, _: Prepared) -> Outcome:
    page = paging.Page.of(req, "list-domains")
    names = _actor_domains(ctx)
    start = bisect_right(names, page.after[0]) if page.after else 0
    stop = len(names) if page.limit is None else start + page.limit
    out: list[dict[str, Any]] = []
    # Linked but not enabled yet: listed apart (the spec's `domains` are the email-enabled
    # ones), so that a caller, an assistant above all, can find what it may enable-email.
    # A page counts the domains of both lists.
    pending = []
    for name in names[start:stop]:
        dom = ctx.state.domains[name]
        if not dom.email_enabled:
            pending.append({"domain": name, "project_id": dom.project_id})
            continue
        active = dom.active_count()
        out.append(
            {
                "domain": name,
                "project_id": dom.project_id,
                "mailboxes": len(dom.mailboxes),
                "active_mailboxes": active,
                "inactive_mailboxes": len(dom.mailboxes) - active,
                "aliases": len(dom.aliases),
                "alias_of": dom.alias_of,
                "home": dom.home,
                "moving_to": dom.moving_to,
                "replica": dom.replica,
            }
        )
    listed = [entry["domain"] for entry in out]
    usage = _usage_of(ctx, listed)
    checks = ctx.dns_status(listed) if ctx.dns_status is not None and listed else {}
    for entry in out:
        entry.update(_domain_usage(ctx.state.domains[entry["domain"]], usage.get(entry["domain"], {})))
        check = checks.get(entry["domain"], {})
        entry.update(dns_ok=check.get("ok"), dns_checked_at=check.get("checked_at"))
    last = names[min(stop, len(names)) - 1] if start < len(names) else None
    return Outcome(
        page.finish({"domains": out, "linked_not_enabled": pending}, (last,) if last else None, stop < len(names))
    )


def _domain_usage(dom: m.DomainFile, rows: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    """Totals over the domain's current mailboxes that a node has reported (null if none has)."""
    if not rows:  # no report for the domain: skip the walk over its mailboxes (list-domains of 1k domains)
        return {"used_mb": None, "messages": None, "usage_reported_at": None}
    found = [
        rows[(local, box.id)] for local, box in dom.mailboxes.items() if box.id is not None and (local, box.id) in rows
    ]
    if not found:
        return {"used_mb": None, "messages": None, "usage_reported_at": None}
    return {
        "used_mb": bytes_to_mb(sum(r["used_bytes"] for r in found)),
        "messages": sum(r["messages"] for r in found),
        "usage_reported_at": max(r["reported_at"] for r in found),
    }


def add_domain(ctx: Context, req: m.AddDomainRequest, _: Prepared) -> Outcome:
    _require_admin(ctx)
    if req.domain in ctx.state.domains:
        raise Conflict(f"Domain {req.domain} is already registered.", code="domain_exists", target=req.domain)
    new = _placed(ctx, m.DomainFile(domain=req.domain, project_id=req.project_id, email_enabled=True))
    return _write(new, req.domain, _domain_result(new), req.project_id, created=True)


def remove_domain(ctx: Context, req: m.RemoveDomainRequest, _: Prepared) -> Outcome:
    _require_admin(ctx)
    dom = _visible_domain(ctx, req.domain)
    _remove_mail(dom)
    _no_alias_domains_of(ctx, dom.domain)
    return _write(None, req.domain, {"domain": req.domain, "removed": True}, dom.project_id)


# --- mailboxes ---------------------------------------------------------------------------


def _hash_prepare(req: Any, settings: m.Settings) -> Prepared:
    return {"hash": hash_password(req.password, settings.bcrypt_cost)}


def _add_user_prepare(req: Any, settings: m.Settings) -> Prepared:
    # The random half of the new mailbox's id; the date half comes from ctx.now in apply.
    return {**_hash_prepare(req, settings), "id_random": secrets.token_hex(3)}


def new_mailbox_id(now: datetime, random_hex: str) -> str:
    """A mailbox id, `<yyyymmdd>-<6 lowercase hex>`: the creation day and 24 random bits."""
    return f"{now:%Y%m%d}-{random_hex}"


def add_user(ctx: Context, req: m.AddUserRequest, prep: Prepared) -> Outcome:
    local, _, name = req.email.partition("@")
    dom = _mail_domain(ctx, name)
    existing = dom.mailboxes.get(local)
    if existing is not None:
        # A soft-deleted mailbox still owns its mail on disk; handing the address to a new
        # password would hand that mail to whoever holds it.
        state = (
            "exists"
            if existing.active
            else "exists (soft-deleted, its mail kept; restore-user brings it back, or hard-delete it to reuse the address as a new, empty mailbox)"
        )
        raise Conflict(f"Mailbox {req.email} {state}.", code="mailbox_exists", target=req.email)
    if local in dom.aliases:
        raise Conflict(f"{req.email} is an alias; remove the alias first.", code="address_in_use", target=req.email)
    quota = req.quota_mb if req.quota_mb is not None else ctx.state.settings.default_quota_mb
    box_id = None
    if ctx.state.settings.format >= 2:
        # A fresh id for every creation, so a re-added address never meets the old Maildir.
        # (The preflight apply runs before prepare, with placeholder values.)
        box_id = new_mailbox_id(ctx.now, str(prep.get("id_random") or "000000"))
    box = m.Mailbox(id=box_id, password=prep["hash"], quota_mb=quota, active=True)
    new = _with_mailboxes(dom, {**dom.mailboxes, local: box})
    result = {"email": req.email, "domain": name, "quota_mb": quota, "active": True, "id": box_id}
    out = _write(new, name, result, dom.project_id, created=True)
    out.target = req.email
    return out


def remove_user(ctx: Context, req: m.RemoveUserRequest, _: Prepared) -> Outcome:
    dom, local, box = _mailbox(ctx, req.email)
    result = {"email": req.email, "hard_delete": req.hard_delete, "active": False}
    if req.hard_delete:
        mailboxes = {k: b for k, b in dom.mailboxes.items() if k != local}
    elif not box.active:
        return Outcome(result, target=req.email, project=dom.project_id)
    else:
        mailboxes = {**dom.mailboxes, local: box.model_copy(update={"active": False})}
    new = _with_mailboxes(dom, mailboxes)
    out = _write(new, dom.domain, result, dom.project_id)
    out.target = req.email
    return out


def restore_user(ctx: Context, req: m.RestoreUserRequest, _: Prepared) -> Outcome:
    dom, local, box = _mailbox(ctx, req.email)
    if box.active:
        raise Conflict(
            f"Mailbox {req.email} is active; only a soft-deleted mailbox can be restored.",
            code="mailbox_active",
            target=req.email,
        )
    # Same id, so the same home: the Maildir the nodes kept comes back with all its mail.
    new = _with_mailboxes(dom, {**dom.mailboxes, local: box.model_copy(update={"active": True})})
    out = _write(new, dom.domain, {"email": req.email, "active": True, "restored": True, "id": box.id}, dom.project_id)
    out.target = req.email
    return out


def _usage_of(ctx: Context, names: list[str]) -> dict[str, dict[tuple[str, str], dict[str, Any]]]:
    return ctx.usage(names) if ctx.usage is not None and names else {}


def _usage_fields(row: dict[str, Any] | None) -> dict[str, Any]:
    if row is None:
        return {"used_mb": None, "messages": None, "usage_reported_at": None}
    return {
        "used_mb": bytes_to_mb(row["used_bytes"]),
        "messages": row["messages"],
        "usage_reported_at": row["reported_at"],
    }


def bytes_to_mb(used_bytes: int) -> float:
    """Bytes as MB (MiB, like quota_mb), two decimals."""
    return round(used_bytes / 1048576, 2)


def list_users(ctx: Context, req: m.ListUsersRequest, _: Prepared) -> Outcome:
    page = paging.Page.of(req, "list-users", req.domain or "", parts=2)
    # (domain, local part) in listing order, from the cursor on; one more than the page, to
    # know whether another page follows. Lazy, so a page reads only the domains it lists.
    keys = (
        (name, local)
        for name in _listed_domains(ctx, req.domain, page)
        if ctx.state.domains[name].email_enabled
        for local in _entries_after(page, sorted(ctx.state.domains[name].mailboxes), name)
    )
    chosen = list(keys if page.limit is None else itertools.islice(keys, page.limit + 1))
    more = page.limit is not None and len(chosen) > page.limit
    chosen = chosen[: page.limit] if more else chosen
    # One query for the listed domains only. Rows match on the address AND the mailbox id, so
    # a mailbox re-created after a hard delete never shows the old one's figures.
    listed = list(dict.fromkeys(name for name, _ in chosen))
    usage = _usage_of(ctx, listed)
    sent = ctx.sending(listed) if ctx.sending is not None and listed else {}
    users = []
    for name, local in chosen:
        dom = ctx.state.domains[name]
        rows = usage.get(name, {})
        box = dom.mailboxes[local]
        row = rows.get((local, box.id)) if box.id is not None else None
        users.append(
            {
                "email": f"{local}@{name}",
                "domain": name,
                "quota_mb": box.quota_mb,
                "active": box.active,
                "id": box.id,
                "forward_to": list(box.forward_to or []),
                "keep_copy": box.keep_copy,
                **_usage_fields(row),
                "vacation": _vacation_summary(box.vacation),
                **snd.user_fields(box, sent.get(name, {}).get(local), ctx.now),
            }
        )
    return Outcome(page.finish({"users": users}, chosen[-1] if chosen else None, more))


def _vacation_summary(vacation: m.Vacation | None) -> dict[str, Any] | None:
    if vacation is None:
        return None
    return {
        "enabled": vacation.enabled,
        "start": vacation.start.isoformat() if vacation.start else None,
        "end": vacation.end.isoformat() if vacation.end else None,
    }


def update_password(ctx: Context, req: m.UpdatePasswordRequest, prep: Prepared) -> Outcome:
    dom, local, box = _mailbox(ctx, req.email)
    if not box.active:
        raise Conflict(
            f"Mailbox {req.email} is soft-deleted; its password cannot change.",
            code="mailbox_inactive",
            target=req.email,
        )
    new = _with_mailboxes(dom, {**dom.mailboxes, local: box.model_copy(update={"password": prep["hash"]})})
    out = _write(new, dom.domain, {"email": req.email, "updated": True}, dom.project_id)
    out.target = req.email
    return out


# --- aliases, forwarding, catch-all, alias domains (rules in state.aliases) ----------------


def _no_alias_domains_of(ctx: Context, name: str) -> None:
    """Refuse to take the mail away from a domain while alias domains send their mail to it."""
    # The snapshot's index of alias domains by target: a scan of 200k domains costs ~0.3 s.
    users = sorted(ctx.state.alias_users.get(name, ()))
    if users:
        raise Conflict(
            f"{name} is the target of alias domain(s) {', '.join(users[:5])}; remove-alias-domain them first.",
            code="alias_domains_remain",
            target=name,
        )


def _alias_domain_of(ctx: Context, address: str) -> tuple[m.DomainFile, str]:
    """(domain, key) of an alias address on an email-enabled domain the actor may manage."""
    key, name = al.split_address(address)
    return _mail_domain(ctx, name), key


def _alias_result(address: str, dests: list[str]) -> dict[str, Any]:
    return {"address": address, "destinations": dests}


def add_alias(ctx: Context, req: m.AddAliasRequest, _: Prepared) -> Outcome:
    dom, key = _alias_domain_of(ctx, req.address)
    if key != al.CATCH_ALL and key in dom.mailboxes:
        raise Conflict(
            f"{req.address} is a mailbox; an address is either a mailbox or an alias.",
            code="address_in_use",
            target=req.address,
        )
    if key == al.CATCH_ALL and dom.alias_of is not None:
        raise Conflict(
            f"{dom.domain} is an alias domain of {dom.alias_of}: its other addresses already go there.",
            code="address_in_use",
            target=req.address,
        )
    if key in dom.aliases:
        raise Conflict(
            f"The alias {req.address} exists; update-alias changes its destinations.",
            code="alias_exists",
            target=req.address,
        )
    if req.address in req.destinations:
        raise Conflict(f"{req.address} cannot deliver to itself.", code="alias_loop", target=req.address)
    new = dom.model_copy(update={"aliases": {**dom.aliases, key: list(req.destinations)}})
    out = _write(new, dom.domain, _alias_result(req.address, list(req.destinations)), dom.project_id, created=True)
    out.target = req.address
    return out


def _existing_alias(ctx: Context, address: str) -> tuple[m.DomainFile, str]:
    key, name = al.split_address(address)
    dom = ctx.state.domains.get(name)
    visible = dom is not None and (ctx.actor.is_admin or dom.project_id == ctx.actor.project_id)
    if dom is None or not visible or key not in dom.aliases:
        raise NotFound(f"Alias {address} does not exist.", code="alias_not_found", target=address)
    return dom, key


def update_alias(ctx: Context, req: m.UpdateAliasRequest, _: Prepared) -> Outcome:
    dom, key = _existing_alias(ctx, req.address)
    result = _alias_result(req.address, list(req.destinations))
    if dom.aliases[key] == req.destinations:
        return Outcome(result, target=req.address, project=dom.project_id)
    if req.address in req.destinations:
        raise Conflict(f"{req.address} cannot deliver to itself.", code="alias_loop", target=req.address)
    new = dom.model_copy(update={"aliases": {**dom.aliases, key: list(req.destinations)}})
    out = _write(new, dom.domain, result, dom.project_id)
    out.target = req.address
    return out


def remove_alias(ctx: Context, req: m.RemoveAliasRequest, _: Prepared) -> Outcome:
    dom, key = _existing_alias(ctx, req.address)
    new = dom.model_copy(update={"aliases": {k: d for k, d in dom.aliases.items() if k != key}})
    out = _write(new, dom.domain, {"address": req.address, "removed": True}, dom.project_id)
    out.target = req.address
    return out


def list_aliases(ctx: Context, req: m.ListAliasesRequest, _: Prepared) -> Outcome:
    page = paging.Page.of(req, "list-aliases", req.domain or "", parts=2)
    keys = (
        (name, key)
        for name in _listed_domains(ctx, req.domain, page)
        if ctx.state.domains[name].email_enabled and ctx.state.domains[name].aliases
        for key in _entries_after(page, sorted(ctx.state.domains[name].aliases), name)
    )
    chosen = list(keys if page.limit is None else itertools.islice(keys, page.limit + 1))
    more = page.limit is not None and len(chosen) > page.limit
    chosen = chosen[: page.limit] if more else chosen
    out = []
    for name, key in chosen:
        dests = ctx.state.domains[name].aliases[key]
        out.append(
            {
                "address": al.join_address(key, name),
                "domain": name,
                "catch_all": key == al.CATCH_ALL,
                "destinations": list(dests),
            }
        )
    return Outcome(page.finish({"aliases": out}, chosen[-1] if chosen else None, more))


def set_forwarding(ctx: Context, req: m.SetForwardingRequest, _: Prepared) -> Outcome:
    dom, local, box = _mailbox(ctx, req.email)
    if not box.active:
        raise Conflict(
            f"Mailbox {req.email} is soft-deleted; it cannot forward.", code="mailbox_inactive", target=req.email
        )
    if req.email in req.destinations:
        raise Conflict(
            f"{req.email} cannot forward to itself; keep_copy=true keeps a copy.", code="alias_loop", target=req.email
        )
    forward = list(req.destinations) or None
    ow.check_onward(forward, al.box_onward(box)[len(box.forward_to or []) :], field="destinations")
    keep = req.keep_copy if forward else True
    result = {"email": req.email, "destinations": list(req.destinations), "keep_copy": keep}
    if box.forward_to == forward and box.keep_copy == keep:
        return Outcome(result, target=req.email, project=dom.project_id)
    new = _with_mailboxes(
        dom, {**dom.mailboxes, local: box.model_copy(update={"forward_to": forward, "keep_copy": keep})}
    )
    out = _write(new, dom.domain, result, dom.project_id)
    out.target = req.email
    return out


def add_alias_domain(ctx: Context, req: m.AddAliasDomainRequest, _: Prepared) -> Outcome:
    dom = _mail_domain(ctx, req.domain)
    target = ctx.state.domains.get(req.target)
    mine = target is not None and target.project_id == dom.project_id  # both domains belong to one project
    if target is None or not mine or not target.email_enabled or req.target == req.domain:
        raise Conflict(
            f"{req.target} is not another email-enabled domain of this project; an alias domain needs one as its target.",
            code="alias_domain_target_invalid",
            target=req.domain,
        )
    if target.alias_of is not None:
        raise Conflict(
            f"{req.target} is itself an alias domain (of {target.alias_of}).",
            code="alias_domain_target_invalid",
            target=req.domain,
        )
    result = {"domain": req.domain, "alias_of": req.target}
    if dom.alias_of == req.target:
        return Outcome(result, target=req.domain, project=dom.project_id)
    users = sorted(ctx.state.alias_users.get(req.domain, ()))
    if users:
        raise Conflict(
            f"{req.domain} is the target of alias domain(s) {', '.join(users[:5])}; chains of alias domains are not allowed.",
            code="alias_domain_target_invalid",
            target=req.domain,
        )
    if al.CATCH_ALL in dom.aliases:
        raise Conflict(
            f"{req.domain} has a catch-all; remove it before making the domain an alias domain.",
            code="address_in_use",
            target=req.domain,
        )
    if dom.replica is not None:
        raise Conflict(
            f"{req.domain} has a replica ({dom.replica}); an alias domain holds no mail. Remove the replica first "
            "(set-replica with node null).",
            code="replica_not_usable",
            target=req.domain,
        )
    new = dom.model_copy(update={"alias_of": req.target})
    return _write(new, req.domain, result, dom.project_id)


def remove_alias_domain(ctx: Context, req: m.RemoveAliasDomainRequest, _: Prepared) -> Outcome:
    dom = _visible_domain(ctx, req.domain)
    if dom.alias_of is None:
        raise NotFound(f"{req.domain} is not an alias domain.", code="alias_not_found", target=req.domain)
    new = dom.model_copy(update={"alias_of": None})
    return _write(new, req.domain, {"domain": req.domain, "alias_of": None}, dom.project_id)


# --- what mailbox owners ask for: vacation, filters, app passwords (rules in state.owners) ----


def _active_mailbox(ctx: Context, email: str, what: str) -> tuple[m.DomainFile, str, m.Mailbox]:
    dom, local, box = _mailbox(ctx, email)
    if not box.active:
        raise Conflict(f"Mailbox {email} is soft-deleted; {what}.", code="mailbox_inactive", target=email)
    return dom, local, box


def _box_write(dom: m.DomainFile, local: str, box: m.Mailbox, result: dict[str, Any], email: str) -> Outcome:
    out = _write(_with_mailboxes(dom, {**dom.mailboxes, local: box}), dom.domain, result, dom.project_id)
    out.target = email
    return out


def _vacation_info(vacation: m.Vacation | None) -> dict[str, Any] | None:
    return None if vacation is None else vacation.model_dump(mode="json")


_VACATION_FIELDS = ("subject", "body", "start", "end", "interval_days")


def set_vacation(ctx: Context, req: m.SetVacationRequest, _: Prepared) -> Outcome:
    dom, local, box = _active_mailbox(ctx, req.email, "it cannot reply")
    # A field left out keeps what is stored (so a dashboard can switch the reply on and off);
    # one given, null included, replaces it.
    stored = box.vacation.model_dump() if box.vacation is not None else {}
    given = {f: getattr(req, f) for f in _VACATION_FIELDS if f in req.model_fields_set}
    merged = {**stored, **given, "enabled": req.enabled}
    texts = [merged.get(f) for f in ("subject", "body", "start", "end")]
    vacation = None
    if req.enabled or any(t is not None for t in texts):
        if req.enabled and merged.get("body") is None:
            raise Conflict(
                f"{req.email} has no vacation text to send: set `body`.", code="vacation_text_missing", target=req.email
            )
        if merged.get("start") and merged.get("end") and merged["end"] < merged["start"]:
            raise Conflict(
                f"The vacation would end ({merged['end']}) before it starts ({merged['start']}).",
                code="vacation_ends_before_start",
                target=req.email,
            )
        vacation = m.Vacation(**merged)
    result = {"email": req.email, "vacation": _vacation_info(vacation)}
    if box.vacation == vacation:
        return Outcome(result, target=req.email, project=dom.project_id)
    return _box_write(dom, local, box.model_copy(update={"vacation": vacation}), result, req.email)


def _filter_infos(filters: list[m.Filter] | None) -> list[dict[str, Any]]:
    return [f.model_dump(mode="json") for f in filters or ()]


def set_filters(ctx: Context, req: m.SetFiltersRequest, _: Prepared) -> Outcome:
    dom, local, box = _active_mailbox(ctx, req.email, "it has no filters")
    rules = [m.Filter(**raw) for raw in req.filters]
    redirects = ow.redirect_targets(req.filters)
    if req.email in redirects:
        raise Conflict(f"{req.email} cannot redirect to itself.", code="alias_loop", target=req.email)
    ow.check_onward(box.forward_to, redirects)
    result = {"email": req.email, "filters": _filter_infos(rules)}
    filters = rules or None
    if box.filters == filters:
        return Outcome(result, target=req.email, project=dom.project_id)
    new_box = box.model_copy(update={"filters": filters})
    return _box_write(dom, local, new_box, result, req.email)


def list_filters(ctx: Context, req: m.MailboxRequest, _: Prepared) -> Outcome:
    _dom, _local, box = _mailbox(ctx, req.email)
    return Outcome({"filters": _filter_infos(box.filters)})


def _policy_dict(policy: m.SpamPolicy | None) -> dict[str, Any] | None:
    return None if policy is None else policy.model_dump()


def _spam_levels(ctx: Context, dom: m.DomainFile, box: m.Mailbox | None) -> dict[str, Any]:
    default = ctx.state.settings.spam
    levels = [_policy_dict(box.spam_policy) if box is not None else None, _policy_dict(dom.spam_policy)]
    return spam.effective(*levels, _policy_dict(default)).as_dict()


def set_spam_policy(ctx: Context, req: m.SetSpamPolicyRequest, _: Prepared) -> Outcome:
    policy = (
        None
        if req.action is None
        else m.SpamPolicy(action=req.action, junk_score=req.junk_score, reject_score=req.reject_score)
    )
    if req.email is not None:
        dom, local, box = _active_mailbox(ctx, req.email, "it receives no mail")
        new_box = box.model_copy(update={"spam_policy": policy})
        result = {"email": req.email, "policy": _policy_dict(policy), "effective": _spam_levels(ctx, dom, new_box)}
        if box.spam_policy == policy:
            return Outcome(result, target=req.email, project=dom.project_id)
        return _box_write(dom, local, new_box, result, req.email)
    assert req.domain is not None  # the request's validator: exactly one of them
    dom = _mail_domain(ctx, req.domain)
    new_dom = dom.model_copy(update={"spam_policy": policy})
    result = {"domain": dom.domain, "policy": _policy_dict(policy), "effective": _spam_levels(ctx, new_dom, None)}
    if dom.spam_policy == policy:
        return Outcome(result, target=dom.domain, project=dom.project_id)
    return _write(new_dom, dom.domain, result, dom.project_id)


def list_spam_policy(ctx: Context, req: m.ListSpamPolicyRequest, _: Prepared) -> Outcome:
    if req.domain is not None:
        names = [_visible_domain(ctx, req.domain).domain]
    else:
        names = sorted(
            name
            for name, dom in ctx.state.domains.items()
            if ctx.actor.is_admin or dom.project_id == ctx.actor.project_id
        )
    policies: list[dict[str, Any]] = []
    for name in names:
        dom = ctx.state.domains[name]
        if dom.spam_policy is not None:
            policies.append(
                {
                    "domain": name,
                    "email": None,
                    "policy": _policy_dict(dom.spam_policy),
                    "effective": _spam_levels(ctx, dom, None),
                }
            )
        for local, box in sorted(dom.mailboxes.items()):
            if box.spam_policy is not None:
                policies.append(
                    {
                        "domain": name,
                        "email": f"{local}@{name}",
                        "policy": _policy_dict(box.spam_policy),
                        "effective": _spam_levels(ctx, dom, box),
                    }
                )
    default = spam.effective(_policy_dict(ctx.state.settings.spam)).as_dict()
    return Outcome({"default": default, "policies": policies})


def _rules_scope(ctx: Context, domain: str | None, email: str | None) -> tuple[m.DomainFile, str | None, Any]:
    """(domain, local part or None, the scope's model: the mailbox or the domain) of a sender rule call."""
    if email is not None:
        dom, local, box = _active_mailbox(ctx, email, "it receives no mail")
        return dom, local, box
    assert domain is not None  # the request's validator: exactly one of them
    dom = _mail_domain(ctx, domain)
    return dom, None, dom


def _rules_write(dom: m.DomainFile, local: str | None, rules: dict[str, str], result: dict[str, Any]) -> Outcome:
    value = rules or None
    if local is None:
        return _write(dom.model_copy(update={"sender_rules": value}), dom.domain, result, dom.project_id)
    box = dom.mailboxes[local].model_copy(update={"sender_rules": value})
    return _box_write(dom, local, box, result, f"{local}@{dom.domain}")


def add_sender_rule(ctx: Context, req: m.AddSenderRuleRequest, _: Prepared) -> Outcome:
    dom, local, scope = _rules_scope(ctx, req.domain, req.email)
    rules = dict(scope.sender_rules or {})
    result = {"domain": dom.domain, "email": req.email, "sender": req.sender, "action": req.action}
    if rules.get(req.sender) == req.action:
        return Outcome(result, target=req.email or dom.domain, project=dom.project_id)
    if req.sender not in rules and len(rules) >= spam.MAX_SENDER_RULES:
        raise Conflict(
            f"{req.email or dom.domain} has {spam.MAX_SENDER_RULES} sender rules, the most it may have; remove one first.",
            code="too_many_sender_rules",
            target=req.email or dom.domain,
        )
    rules[req.sender] = req.action
    out = _rules_write(dom, local, rules, result)
    out.created = True
    return out


def remove_sender_rule(ctx: Context, req: m.RemoveSenderRuleRequest, _: Prepared) -> Outcome:
    dom, local, scope = _rules_scope(ctx, req.domain, req.email)
    rules = dict(scope.sender_rules or {})
    if req.sender not in rules:
        where = req.email or dom.domain
        raise NotFound(f"{where} has no rule for {req.sender}.", code="sender_rule_not_found", target=where)
    action = rules.pop(req.sender)
    return _rules_write(
        dom, local, rules, {"domain": dom.domain, "email": req.email, "sender": req.sender, "action": action}
    )


def list_sender_rules(ctx: Context, req: m.ListSenderRulesRequest, _: Prepared) -> Outcome:
    if req.email is not None:
        dom, local, box = _mailbox(ctx, req.email)
        scopes: list[tuple[m.DomainFile, str | None, Any]] = [(dom, local, box)]
    else:
        names = (
            [_visible_domain(ctx, req.domain).domain]
            if req.domain is not None
            else sorted(
                n for n, d in ctx.state.domains.items() if ctx.actor.is_admin or d.project_id == ctx.actor.project_id
            )
        )
        scopes = []
        for name in names:
            dom = ctx.state.domains[name]
            scopes.append((dom, None, dom))
            scopes += [(dom, local, box) for local, box in sorted(dom.mailboxes.items())]
    rules = [
        {"domain": dom.domain, "email": f"{local}@{dom.domain}" if local else None, "sender": sender, "action": action}
        for dom, local, scope in scopes
        for sender, action in sorted((scope.sender_rules or {}).items())
    ]
    return Outcome({"rules": rules})


def _app_password_prepare(req: Any, settings: m.Settings) -> Prepared:
    # Made and hashed outside the write lock (bcrypt); the password is answered once, never stored.
    password = ow.new_app_password()
    return {
        "password": password,
        "hash": hash_password(password, settings.bcrypt_cost),
        "tag": ow.password_tag(password),
    }


def add_app_password(ctx: Context, req: m.AddAppPasswordRequest, prep: Prepared) -> Outcome:
    dom, local, box = _active_mailbox(ctx, req.email, "it cannot log in")
    entries = dict(box.app_passwords or {})
    if any(name.casefold() == req.name.casefold() for name in entries):
        raise InvalidInput(
            f"The mailbox has an app password named {req.name!r} already; names are unique (case-insensitive).",
            code="app_password_name_taken",
            field="name",
        )
    slot = ow.free_slot(entry.slot for entry in entries.values())
    if slot is None:
        raise InvalidInput(
            f"A mailbox may have at most {ow.MAX_APP_PASSWORDS} app passwords; remove one first.",
            code="too_many_app_passwords",
            field="name",
        )
    tag = str(prep.get("tag") or "0000")  # the preflight apply runs before prepare, with placeholders
    entries[req.name] = m.AppPassword(hash=prep["hash"], scopes=req.scopes, slot=slot, tag=tag, created_at=ctx.now)
    result = {"name": req.name, "scopes": list(req.scopes), "password": str(prep.get("password", ""))}
    out = _box_write(dom, local, box.model_copy(update={"app_passwords": entries}), result, req.email)
    out.created = True
    return out


def list_app_passwords(ctx: Context, req: m.MailboxRequest, _: Prepared) -> Outcome:
    dom, local, box = _mailbox(ctx, req.email)
    uses = ctx.app_uses(dom.domain, local) if ctx.app_uses is not None and box.app_passwords else {}
    out = []
    for name, entry in sorted((box.app_passwords or {}).items(), key=lambda item: item[0].casefold()):
        created = entry.created_at.isoformat()
        out.append(
            {
                "name": name,
                "scopes": list(entry.scopes),
                "created_at": created,
                "last_used_at": uses.get((name, created)),
            }
        )
    return Outcome({"app_passwords": out})


def remove_app_password(ctx: Context, req: m.RemoveAppPasswordRequest, _: Prepared) -> Outcome:
    dom, local, box = _mailbox(ctx, req.email)
    entries = dict(box.app_passwords or {})
    if req.name not in entries:
        raise NotFound(
            f"Mailbox {req.email} has no app password named {req.name!r}.",
            code="app_password_not_found",
            target=req.email,
        )
    del entries[req.name]
    result = {"name": req.name, "removed": True}
    return _box_write(dom, local, box.model_copy(update={"app_passwords": entries or None}), result, req.email)


# --- DNS (rules in state.dns) ----------------------------------------------------------------


def _domain_records(ctx: Context, dom: m.DomainFile) -> list[dict[str, Any]]:
    settings = effective_dns(ctx.state.settings.dns, placement.addressed(ctx.state.nodes))
    if settings is None:
        raise Conflict(
            "This server has no DNS settings: add a `dns:` block with `mx_hosts` to mailstate.yaml, or give the "
            "nodes addresses (add-node address).",
            code="dns_not_configured",
            target=dom.domain,
        )
    keys = ctx.dkim_keys() if ctx.dkim_keys is not None else []
    return records_for(dom.domain, settings, keys, ctx.state.nodes.nodes)


def dns_records(ctx: Context, req: m.DnsRecordsRequest, _: Prepared) -> Outcome:
    dom = _mail_domain(ctx, req.domain)
    return Outcome({"domain": dom.domain, "records": _domain_records(ctx, dom)})


def check_dns(ctx: Context, req: m.CheckDnsRequest, _: Prepared) -> Outcome:
    """dns-records, each record looked up in DNS (state.dnscheck); list-domains shows the verdict."""
    dom = _mail_domain(ctx, req.domain)
    records = _domain_records(ctx, dom)
    if ctx.dns_check is None:
        raise Unavailable("This process cannot check DNS (no resolver is set up).", code="dns_check_unavailable")
    return Outcome(ctx.dns_check(dom.domain, records), target=dom.domain, project=dom.project_id)


def mobileconfig(ctx: Context, req: m.MobileconfigRequest, _: Prepared) -> Outcome:
    """The Apple profile for an address (no password in it); the same for every address of the domain."""
    cs = ac.client_settings(ctx.state, req.email)
    result = {
        "email": cs.email,
        "domain": cs.domain,
        "username": cs.email,
        "imap": cs.imap.as_dict(),
        "smtp": [server.as_dict() for server in cs.smtp],
        "filename": ac.profile_filename(cs),
        "content_type": ac.PROFILE_CONTENT_TYPE,
        "profile": ac.apple_profile(cs).decode("utf-8"),
    }
    return Outcome(result, target=cs.domain)


# --- nodes -------------------------------------------------------------------------------


def _key_prepare(req: Any, settings: m.Settings) -> Prepared:
    key, digest = new_sync_key()
    return {"sync_key": key, "sha256": digest}


def _nodes_outcome(
    ctx: Context, nodes: dict[str, m.Node], result: dict[str, Any], target: str, created: bool = False
) -> Outcome:
    return Outcome(result, change=Change(nodes=m.NodesFile(nodes=nodes)), target=target, created=created)


def _unix(iso: object) -> int | None:
    try:
        return int(datetime.fromisoformat(iso).timestamp()) if isinstance(iso, str) else None
    except ValueError:
        return None


def node_freshness(status: Mapping[str, Any], now: int) -> dict[str, Any]:
    """list-nodes' lag_s, stale, statement_age_s, last report and last error for one node's status
    (state.store node_status): see NodeInfo for what each means."""
    if not status:
        return {"lag_s": None, "stale": None, "statement_age_s": None, "last_report_at": None, "last_report_age_s": None,
                "last_error": None, "last_error_at": None}  # fmt: skip
    reported = _unix(status.get("last_sync_at"))
    report_age = max(0, now - reported) if reported is not None else None
    issued = status.get("statement_issued_at")
    behind, since = status.get("commits_behind"), status.get("behind_since")
    if status.get("diverged") or not status.get("applied_commit") or behind is None:
        lag = None
    elif behind == 0:
        lag = 0
    else:
        lag = max(0, now - since) if isinstance(since, int) else None
    silent = report_age is not None and report_age > report_stale_after()
    return {
        "lag_s": lag,
        "stale": status.get("status") == "stale" or silent,
        "statement_age_s": max(0, now - issued) if isinstance(issued, int) else None,
        "last_report_at": status.get("last_sync_at"),
        "last_report_age_s": report_age,
        "last_error": status.get("last_error"),
        "last_error_at": status.get("last_error_at"),
    }


def replication_of(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """list-nodes' `replication` of a node: its last report's, as the node measured it (a node that
    went silent shows its last figures; `stale` and last_report_age_s say how old they are)."""
    keys = ("peer", "domains", "lag_s", "last_sync_at", "error")
    out = []
    for entry in status.get("replication") or []:
        row = {key: entry.get(key) for key in keys}
        if isinstance(row["last_sync_at"], int):
            row["last_sync_at"] = datetime.fromtimestamp(row["last_sync_at"], UTC).isoformat()
        out.append(row)
    return out


def list_nodes(ctx: Context, req: m.ListNodesRequest, _: Prepared) -> Outcome:
    _require_admin(ctx)
    page = paging.Page.of(req, "list-nodes")
    names = sorted(ctx.state.nodes.nodes)
    start = bisect_right(names, page.after[0]) if page.after else 0
    stop = len(names) if page.limit is None else start + page.limit
    out = []
    for name in names[start:stop]:
        node = ctx.state.nodes.nodes[name]
        status = ctx.node_status(name) or {}
        out.append(
            {
                "name": name,
                "ip_address": node.ip_address,
                "created_at": node.created_at.isoformat(),
                "last_sync_at": status.get("last_sync_at"),
                "applied_commit": status.get("applied_commit"),
                "status": status.get("status", "never_synced"),
                "error": status.get("error"),
                "commits_behind": status.get("commits_behind"),
                "diverged": status.get("diverged"),
                **node_freshness(status, int(ctx.now.timestamp())),
                "address": node.address,
                "domains": len(ctx.state.homes.get(name, ())),
                "mailboxes": ctx.state.home_boxes.get(name, 0),
                "tls_fingerprint": v.certificate_fingerprint(node.tls_certificate) if node.tls_certificate else None,
                "replication": replication_of(status),
                "spam_filter": status.get("spam_filter"),
                "postscreen": status.get("postscreen"),
            }
        )
    last = names[min(stop, len(names)) - 1] if start < len(names) else None
    return Outcome(page.finish({"nodes": out}, (last,) if last else None, stop < len(names)))


def add_node(ctx: Context, req: m.AddNodeRequest, prep: Prepared) -> Outcome:
    _require_admin(ctx)
    if req.name in ctx.state.nodes.nodes:
        raise Conflict(f"Node {req.name} already exists.", code="node_exists", target=req.name)
    _address_free(ctx, req.address, req.name)
    node = m.Node(ip_address=req.ip_address, address=req.address, sync_key_sha256=prep["sha256"], created_at=ctx.now)
    result = {
        "name": req.name,
        "ip_address": req.ip_address,
        "address": req.address,
        "created_at": node.created_at.isoformat(),
        "sync_key": prep["sync_key"],
    }
    return _nodes_outcome(ctx, {**ctx.state.nodes.nodes, req.name: node}, result, req.name, created=True)


def _address_free(ctx: Context, address: str | None, name: str) -> None:
    """Two nodes never share an address: a proxied login or a relayed message would reach either."""
    for other, node in ctx.state.nodes.nodes.items():
        if address is not None and other != name and node.address == address:
            raise Conflict(f"Node {other} already has the address {address}.", code="address_in_use", target=name)


def _not_in_use(ctx: Context, name: str, doing: str) -> None:
    why = placement.in_use(ctx.state.homes, ctx.state.moves, name, ctx.state.replicas)
    if why is not None:
        raise Conflict(
            f"Node {name} cannot {doing}: {why}. Move its domains to another node first (move-domain), and give "
            "the domains it is the replica of another one (set-replica).",
            code="node_in_use",
            target=name,
        )


def remove_node(ctx: Context, req: m.NodeRequest, _: Prepared) -> Outcome:
    _require_admin(ctx)
    if req.name not in ctx.state.nodes.nodes:
        raise NotFound(f"Node {req.name} does not exist.", code="node_not_found", target=req.name)
    _not_in_use(ctx, req.name, "go")
    nodes = {k: n for k, n in ctx.state.nodes.nodes.items() if k != req.name}
    return _nodes_outcome(ctx, nodes, {"name": req.name, "removed": True}, req.name)


def rotate_node_key(ctx: Context, req: m.NodeRequest, prep: Prepared) -> Outcome:
    _require_admin(ctx)
    node = ctx.state.nodes.nodes.get(req.name)
    if node is None:
        raise NotFound(f"Node {req.name} does not exist.", code="node_not_found", target=req.name)
    nodes = {**ctx.state.nodes.nodes, req.name: node.model_copy(update={"sync_key_sha256": prep["sha256"]})}
    return _nodes_outcome(ctx, nodes, {"name": req.name, "sync_key": prep["sync_key"]}, req.name)


# --- platform controls: plan limits (rules in state.limits), sending (state.sending), webhooks ----


def _limits_state(ctx: Context) -> lim.State:
    return lim.State(ctx.state.domains, ctx.state.by_project, ctx.state.projects)


def set_limits(ctx: Context, req: m.SetLimitsRequest, _: Prepared) -> Outcome:
    """[Admin] Set or remove (null) a project's or a domain's limits; the store refuses a limit
    below what the scope uses (409 limit_below_use), state.limits."""
    _require_admin(ctx)
    changes = req.changes()
    if req.domain is None and req.project_id is not None:
        pid = req.project_id
        old = ctx.state.projects.get(pid)
        before = lim.limits_of(old.limits if old is not None else None)
        after = {k: val for k, val in {**before, **changes}.items() if val is not None}
        result: dict[str, Any] = {"project_id": pid, "domain": None, "limits": lim.scope_limits(m.Limits(**after))}
        target = f"project {pid}"
        if after == before:
            return Outcome(result, target=target, project=pid)
        new = m.ProjectFile(project_id=pid, limits=m.Limits(**after)) if after else None
        return Outcome(result, change=Change(projects={pid: new}), target=target, project=pid)
    assert req.domain is not None
    dom = _visible_domain(ctx, req.domain)
    if req.project_id is not None and dom.project_id != req.project_id:
        raise NotFound(f"Domain {req.domain} is not linked to project {req.project_id}.", code="domain_not_found")
    before = lim.limits_of(dom.limits)
    after = {k: val for k, val in {**before, **changes}.items() if val is not None}
    result = {"project_id": dom.project_id, "domain": dom.domain, "limits": lim.scope_limits(m.Limits(**after))}
    if after == before:
        return Outcome(result, target=dom.domain, project=dom.project_id)
    new_dom = dom.model_copy(update={"limits": m.Limits(**after) if after else None})
    return _write(new_dom, dom.domain, result, dom.project_id)


def _scopes_in_view(ctx: Context, req: m.ListLimitsRequest) -> tuple[list[int], list[str]]:
    """(projects, domains) list-limits answers for: what the filters name, within what the actor sees."""
    if req.domain is not None:
        dom = _visible_domain(ctx, req.domain)
        if req.project_id is not None and dom.project_id != req.project_id:
            raise NotFound(f"Domain {req.domain} is not linked to project {req.project_id}.", code="domain_not_found")
        return ([dom.project_id] if dom.project_id is not None else []), [dom.domain]
    if req.project_id is not None:
        if not ctx.actor.is_admin and req.project_id != ctx.actor.project_id:
            raise NotFound(f"Project {req.project_id} is not yours.", code="project_not_found")
        projects = [req.project_id]
    elif ctx.actor.is_admin:
        projects = sorted(ctx.state.projects)
    else:
        projects = [ctx.actor.project_id or 0]
    if not ctx.actor.is_admin or req.project_id is not None:
        names = [n for p in projects for n in sorted(ctx.state.by_project.get(p, ()))]
    else:
        names = [n for n in ctx.state.sorted_domains if ctx.state.domains[n].limits]
    return projects, [n for n in names if ctx.state.domains[n].email_enabled or ctx.state.domains[n].limits]


def list_limits(ctx: Context, req: m.ListLimitsRequest, _: Prepared) -> Outcome:
    projects, names = _scopes_in_view(ctx, req)
    view = _limits_state(ctx)
    sent = (
        ctx.sending(sorted(set(names) | {n for p in projects for n in view.project_domains(p)})) if ctx.sending else {}
    )
    out = []
    for pid in projects:
        members = view.project_domains(pid)
        found = ctx.state.projects.get(pid)
        out.append(
            snd.limits_entry(
                ctx.state.settings,
                pid,
                None,
                found.limits if found is not None else None,
                view.project_use(pid),
                [ctx.state.domains[n] for n in members],
                sent,
                None,
            )
        )
    for name in names:
        dom = ctx.state.domains[name]
        project = ctx.state.projects.get(dom.project_id) if dom.project_id is not None else None
        out.append(
            snd.limits_entry(
                ctx.state.settings, dom.project_id, name, dom.limits, lim.domain_use(dom), [dom], sent, project
            )
        )
    return Outcome({"limits": out})


def set_quota(ctx: Context, req: m.SetQuotaRequest, _: Prepared) -> Outcome:
    dom, local, box = _mailbox(ctx, req.email)
    if not box.active:
        raise Conflict(
            f"Mailbox {req.email} is soft-deleted; its quota cannot change.", code="mailbox_inactive", target=req.email
        )
    result = {"email": req.email, "quota_mb": req.quota_mb}
    if box.quota_mb == req.quota_mb:
        return Outcome(result, target=req.email, project=dom.project_id)
    new = _with_mailboxes(dom, {**dom.mailboxes, local: box.model_copy(update={"quota_mb": req.quota_mb})})
    out = _write(new, dom.domain, result, dom.project_id)
    out.target = req.email
    return out


def suspend_sending(ctx: Context, req: m.SuspendSendingRequest, _: Prepared) -> Outcome:
    dom, local, box = _mailbox(ctx, req.email)
    result = {"email": req.email, "sending": "suspended", "reason": req.reason}
    new_state = snd.suspended(box.sending, req.reason, ctx.now)
    if new_state == box.sending:
        return Outcome(result, target=req.email, project=dom.project_id)
    new = _with_mailboxes(dom, {**dom.mailboxes, local: box.model_copy(update={"sending": new_state})})
    out = _write(new, dom.domain, result, dom.project_id)
    out.target = req.email
    return out


def resume_sending(ctx: Context, req: m.ResumeSendingRequest, _: Prepared) -> Outcome:
    dom, local, box = _mailbox(ctx, req.email)
    result = {"email": req.email, "sending": "ok", "reason": None}
    report = ctx.sending([dom.domain]).get(dom.domain, {}).get(local) if ctx.sending is not None else None
    if not snd.needs_resume(box, report):
        return Outcome(result, target=req.email, project=dom.project_id)
    new_state = m.MailboxSending(suspended=False, changed_at=snd.next_change(box.sending, ctx.now))
    new = _with_mailboxes(dom, {**dom.mailboxes, local: box.model_copy(update={"sending": new_state})})
    out = _write(new, dom.domain, result, dom.project_id)
    out.target = req.email
    return out


def _webhooks(ctx: Context) -> WebhookRegistry:
    if ctx.webhooks is None:
        raise Unavailable("This process keeps no webhooks (no local database).", code="webhooks_unavailable")
    return ctx.webhooks


def add_webhook(ctx: Context, req: m.AddWebhookRequest, _: Prepared) -> Outcome:
    admin_only = sorted(set(req.events) & m.ADMIN_EVENTS)
    if admin_only and not ctx.actor.is_admin:
        raise Forbidden(
            f"{', '.join(admin_only)} are platform events: they need an admin token.", code="admin_required"
        )
    found = _webhooks(ctx).add_hook(ctx.actor.project_id, req.url, list(req.events), req.secret, ctx.now)
    return Outcome(found, target=found["id"], project=ctx.actor.project_id, created=True)


def list_webhooks(ctx: Context, req: m.ListWebhooksRequest, _: Prepared) -> Outcome:
    return Outcome({"webhooks": _webhooks(ctx).list_hooks(ctx.actor.project_id)})


def remove_webhook(ctx: Context, req: m.RemoveWebhookRequest, _: Prepared) -> Outcome:
    if not _webhooks(ctx).remove_hook(req.id, ctx.actor.project_id):
        raise NotFound(f"Webhook {req.id} does not exist.", code="webhook_not_found", target=req.id)
    return Outcome({"id": req.id, "removed": True}, target=req.id, project=ctx.actor.project_id)


def set_node_address(ctx: Context, req: m.SetNodeAddressRequest, _: Prepared) -> Outcome:
    """Give a node an address (it may become a home), change it (the domains it is home to are
    re-rendered with it), or take it away from a node that is home to nothing."""
    _require_admin(ctx)
    node = ctx.state.nodes.nodes.get(req.name)
    if node is None:
        raise NotFound(f"Node {req.name} does not exist.", code="node_not_found", target=req.name)
    result = {"name": req.name, "address": req.address}
    if node.address == req.address:
        return Outcome(result, target=req.name)
    if req.address is None:
        _not_in_use(ctx, req.name, "lose its address")
    _address_free(ctx, req.address, req.name)
    nodes = {**ctx.state.nodes.nodes, req.name: node.model_copy(update={"address": req.address})}
    return _nodes_outcome(ctx, nodes, result, req.name)


def move_domain(ctx: Context, req: m.MoveDomainRequest, _: Prepared) -> Outcome:
    """Start moving a domain's mail to another node (docs/fleet.md, "Moving a domain"). The target
    copies with doveadm sync and reports; the server then switches the home (state.fleet)."""
    _require_admin(ctx)
    dom = _mail_domain(ctx, req.domain)
    result = {"domain": dom.domain, "from": dom.home, "to": req.node}
    if req.node == dom.home and dom.moving_to is None:
        return Outcome(result, target=dom.domain, project=dom.project_id)
    if req.node == dom.moving_to:
        return Outcome(result, target=dom.domain, project=dom.project_id)  # already under way
    placement.usable_node(ctx.state.nodes, req.node)
    if dom.moving_to is not None and req.node != dom.home:
        raise Conflict(
            f"{dom.domain} is already moving to {dom.moving_to}; wait for that move (list-domains shows moving_to until "
            f"it is done), or move-domain it back to {dom.home} to call it off.",
            code="move_in_progress",
            target=dom.domain,
        )
    if req.node == dom.home:
        new = dom.model_copy(update={"moving_to": None})  # called off: the target drops its copy
    elif dom.home is None:
        # A domain placed before the fleet had addressed nodes: its mail is where it always was,
        # so it gets its home at once, with nothing to copy (docs/fleet.md, "Addresses and placement").
        new = dom.model_copy(update={"home": req.node})
    else:
        new = dom.model_copy(update={"moving_to": req.node})
    return _write(new, dom.domain, result, dom.project_id)


def set_replica(ctx: Context, req: m.SetReplicaRequest, _: Prepared) -> Outcome:
    """[Admin] Give a domain a replica, change it or remove it (null); docs/fleet.md, "Replicas and
    failover". A new replica gets its copy from the home's next sync; a replica given up keeps its
    Maildirs (no longer synced, served or counted)."""
    _require_admin(ctx)
    dom = _mail_domain(ctx, req.domain)
    result = {"domain": dom.domain, "home": dom.home, "replica": req.node}
    if req.node == dom.replica:
        return Outcome(result, target=dom.domain, project=dom.project_id)
    if req.node is not None:
        placement.usable_node(ctx.state.nodes, req.node)
    new = dom.model_copy(update={"replica": req.node})
    if dom.moved_from is not None and dom.moved_from == dom.replica:
        # A failed-over home that never came back: giving up its replica gives up merging what only it held.
        new = new.model_copy(update={"moved_from": None})
    why = placement.replica_problem(new, ctx.state.nodes)
    if why is not None:
        raise Conflict(why[0].upper() + why[1:] + ".", code="replica_not_usable", target=dom.domain)
    return _write(new, dom.domain, result, dom.project_id)


def _replica_healthy(ctx: Context, name: str) -> bool:
    """Whether a replica can take over now: it reports, recently, and its last tick went well."""
    status = ctx.node_status(name) or {}
    fresh = node_freshness(status, int(ctx.now.timestamp()))
    return bool(status) and status.get("status") == "ok" and not fresh["stale"]


def failover_node(ctx: Context, req: m.NodeRequest, _: Prepared) -> Outcome:
    """[Admin] Make the replica the home of every domain homed on node `name` whose replica is
    healthy, in one commit; the old home becomes the replica and, as `moved_from`, merges what only
    it held into the new home when it returns (pi-pull's drain, as after a move)."""
    _require_admin(ctx)
    if req.name not in ctx.state.nodes.nodes:
        raise NotFound(f"Node {req.name} does not exist.", code="node_not_found", target=req.name)
    moved: list[str] = []
    unavailable: list[str] = []
    changes: dict[str, m.DomainFile | None] = {}
    healthy: dict[str, bool] = {}
    for name in sorted(ctx.state.homes.get(req.name, ())):
        dom = ctx.state.domains[name]
        replica = dom.replica
        if replica is None or not healthy.setdefault(replica, _replica_healthy(ctx, replica)):
            unavailable.append(name)
            continue
        update = {"home": replica, "replica": req.name, "moving_to": None, "moved_from": req.name}
        changes[name] = dom.model_copy(update=update)
        moved.append(name)
    result = {"node": req.name, "moved": moved, "unavailable": unavailable}
    if not changes:
        return Outcome(result, target=req.name)
    return Outcome(result, change=Change(domains=changes), target=req.name)


# --- the registry --------------------------------------------------------------------------

_SPEC = [
    Operation(
        "enable-email", m.EnableEmailRequest, enable_email, summary="Enable email for a domain linked to your project."
    ),
    Operation(
        "disable-email",
        m.DisableEmailRequest,
        disable_email,
        summary="Disable email for a domain. Fails if active mailboxes still exist.",
    ),
    Operation(
        "list-domains",
        m.ListDomainsRequest,
        list_domains,
        method="GET",
        write=False,
        inline=True,
        summary="List all email-enabled domains for your project, with mailbox counts.",
    ),
    Operation(
        "add-user",
        m.AddUserRequest,
        add_user,
        prepare=_add_user_prepare,
        summary="Create a mailbox on one of your email-enabled domains.",
    ),
    Operation(
        "remove-user",
        m.RemoveUserRequest,
        remove_user,
        summary=(
            "Remove a mailbox. Soft delete (default): no login, 550 on delivery, the mail is kept and restore-user brings the "
            "mailbox back. hard_delete=true: the address is removed at once, every node moves its Maildir to the graveyard "
            "and deletes it after purge_after_days (mailstate.yaml, default 7); re-adding the address gives a new, empty mailbox."
        ),
    ),
    Operation(
        "restore-user",
        m.RestoreUserRequest,
        restore_user,
        summary=(
            "Reactivate a soft-deleted mailbox with all its mail (login and delivery work again, same password). "
            "409 mailbox_active if it is active; 404 if there is none (a hard-deleted mailbox cannot be restored)."
        ),
    ),
    Operation(
        "list-users",
        m.ListUsersRequest,
        list_users,
        method="GET",
        write=False,
        inline=True,
        summary="List all mailboxes on your project's email-enabled domains, optionally for one domain.",
    ),
    Operation(
        "update-password",
        m.UpdatePasswordRequest,
        update_password,
        prepare=_hash_prepare,
        summary="Change the password of an existing mailbox.",
    ),
    Operation(
        "add-domain",
        m.AddDomainRequest,
        add_domain,
        admin=True,
        summary="[Admin] Register a mail domain, optionally linked to a project.",
    ),
    Operation(
        "remove-domain",
        m.RemoveDomainRequest,
        remove_domain,
        admin=True,
        summary="[Admin] Remove a mail domain. Fails if active users still exist.",
    ),
    Operation(
        "list-nodes",
        m.ListNodesRequest,
        list_nodes,
        method="GET",
        admin=True,
        write=False,
        inline=True,
        summary="[Admin] List all registered Pi sync nodes with last sync status.",
    ),
    Operation(
        "add-node",
        m.AddNodeRequest,
        add_node,
        admin=True,
        prepare=_key_prepare,
        summary="[Admin] Register a new Pi sync node. Returns its sync key once.",
    ),
]
_EXTRA = [
    Operation(
        "link-domain",
        m.LinkDomainRequest,
        link_domain,
        admin=True,
        in_spec=False,
        summary="[Admin] Link a domain to a project (the dashboard's Domains tab).",
    ),
    Operation(
        "unlink-domain",
        m.UnlinkDomainRequest,
        unlink_domain,
        admin=True,
        in_spec=False,
        summary="[Admin] Unlink a domain from its project; email must be disabled.",
    ),
    Operation(
        "remove-node",
        m.NodeRequest,
        remove_node,
        admin=True,
        in_spec=False,
        summary="[Admin] Remove a sync node; its key stops working.",
    ),
    Operation(
        "rotate-node-key",
        m.NodeRequest,
        rotate_node_key,
        admin=True,
        in_spec=False,
        prepare=_key_prepare,
        summary="[Admin] Give a node a new sync key, returned once; the old key stops working.",
    ),
]

_ALIASES = [
    Operation(
        "add-alias",
        m.AddAliasRequest,
        add_alias,
        summary="Create an alias (local@domain) or a catch-all (@domain) on one of your email-enabled domains.",
    ),
    Operation(
        "update-alias",
        m.UpdateAliasRequest,
        update_alias,
        summary="Replace the destinations of an existing alias or catch-all.",
    ),
    Operation("remove-alias", m.RemoveAliasRequest, remove_alias, summary="Remove an alias or catch-all."),
    Operation(
        "list-aliases",
        m.ListAliasesRequest,
        list_aliases,
        method="GET",
        write=False,
        inline=True,
        summary="List the aliases and catch-alls of your project's email-enabled domains, optionally for one domain.",
    ),
    Operation(
        "set-forwarding",
        m.SetForwardingRequest,
        set_forwarding,
        summary="Forward a mailbox to other addresses, with or without a copy.",
    ),
    Operation(
        "add-alias-domain",
        m.AddAliasDomainRequest,
        add_alias_domain,
        summary="Make a domain an alias domain: mail to x@domain goes to x@target.",
    ),
    Operation(
        "remove-alias-domain",
        m.RemoveAliasDomainRequest,
        remove_alias_domain,
        summary="Turn an alias domain back into an ordinary domain.",
    ),
]

# A fleet's placement: admin operations, and MCP tools like every operation of the contract.
_FLEET = [
    Operation(
        "move-domain",
        m.MoveDomainRequest,
        move_domain,
        admin=True,
        summary="[Admin] Move a domain's mail to another node (its new home): copied with doveadm sync, then switched "
        "in a signed commit; mail keeps flowing and IMAP keeps working throughout. Answers 202.",
    ),
    Operation(
        "set-replica",
        m.SetReplicaRequest,
        set_replica,
        admin=True,
        summary="[Admin] Give a domain a replica: a second node (with an address, not its home) that keeps a copy of "
        "its mailboxes in two-way doveadm sync with the home; node null removes it.",
    ),
    Operation(
        "failover-node",
        m.NodeRequest,
        failover_node,
        admin=True,
        summary="[Admin] Fail a node over: one commit makes the replica the home of every domain homed on the node "
        "(whose replica is healthy); answers the domains moved and those without a usable replica.",
    ),
    Operation(
        "set-node-address",
        m.SetNodeAddressRequest,
        set_node_address,
        admin=True,
        summary="[Admin] Set the address where other nodes and mail clients reach a node (null: none; only a node that "
        "is home to no domain may lose it).",
    ),
]

_DNS = [
    Operation(
        "dns-records",
        m.DnsRecordsRequest,
        dns_records,
        method="GET",
        write=False,
        summary="List the DNS records one of your email-enabled domains needs: MX, SPF, DKIM of every node, DMARC, autoconfig, MTA-STS, TLS-RPT.",
    ),
    Operation(
        "check-dns",
        m.CheckDnsRequest,
        check_dns,
        method="GET",
        write=False,
        summary="Look up every record of dns-records in DNS now: ok, missing or wrong, with what was found.",
    ),
]

_ONBOARDING = [
    Operation(
        "mobileconfig",
        m.MobileconfigRequest,
        mobileconfig,
        method="GET",
        write=False,
        public=True,
        summary="The Apple configuration profile (.mobileconfig) for an address: IMAP and SMTP over TLS, no password.",
    ),
]

_OWNERS = [
    Operation(
        "set-vacation",
        m.SetVacationRequest,
        set_vacation,
        summary="Set a mailbox's out-of-office reply (Sieve vacation on the nodes): on or off, text, dates, interval.",
    ),
    Operation(
        "set-filters",
        m.SetFiltersRequest,
        set_filters,
        summary="Replace a mailbox's filter rules (at most 50, in order): file into a folder, discard, redirect or mark read.",
    ),
    Operation(
        "list-filters",
        m.MailboxRequest,
        list_filters,
        method="GET",
        write=False,
        inline=True,
        summary="List a mailbox's filter rules, in the order they run.",
    ),
    Operation(
        "add-app-password",
        m.AddAppPasswordRequest,
        add_app_password,
        prepare=_app_password_prepare,
        summary="Make an app password for a mailbox (IMAP and/or SMTP); the password is answered once.",
    ),
    Operation(
        "list-app-passwords",
        m.MailboxRequest,
        list_app_passwords,
        method="GET",
        write=False,
        inline=True,
        summary="List a mailbox's app passwords (never the passwords): scopes, when made, when last used.",
    ),
    Operation(
        "remove-app-password",
        m.RemoveAppPasswordRequest,
        remove_app_password,
        summary="Remove an app password; it stops working when the nodes apply the change.",
    ),
]

_CONTROLS = [
    Operation(
        "set-limits",
        m.SetLimitsRequest,
        set_limits,
        admin=True,
        summary="[Admin] Set or remove (null) a project's or a domain's plan limits: mailboxes, aliases, quotas, sending.",
    ),
    Operation(
        "list-limits",
        m.ListLimitsRequest,
        list_limits,
        method="GET",
        write=False,
        inline=True,
        summary="List the plan limits of your project and its domains, each with what it uses now.",
    ),
    Operation("set-quota", m.SetQuotaRequest, set_quota, summary="Change the quota of an active mailbox."),
    Operation(
        "set-spam-policy",
        m.SetSpamPolicyRequest,
        set_spam_policy,
        summary="Set (or remove, action null) a domain's or a mailbox's spam policy: junk, reject or off, and the "
        "scores from which a message is junked or refused.",
    ),
    Operation(
        "add-sender-rule",
        m.AddSenderRuleRequest,
        add_sender_rule,
        summary="Allow or block an envelope sender (an address or @domain) for a domain or a mailbox: allowed mail is "
        "never junked or refused for its score, blocked mail is refused at SMTP time.",
    ),
    Operation(
        "list-sender-rules",
        m.ListSenderRulesRequest,
        list_sender_rules,
        method="GET",
        write=False,
        inline=True,
        summary="List the allow and block rules of your domains and mailboxes.",
    ),
    Operation(
        "remove-sender-rule",
        m.RemoveSenderRuleRequest,
        remove_sender_rule,
        summary="Remove a sender's allow or block rule from a domain or a mailbox.",
    ),
    Operation(
        "list-spam-policy",
        m.ListSpamPolicyRequest,
        list_spam_policy,
        method="GET",
        write=False,
        inline=True,
        summary="List the default spam policy and the domains' and mailboxes' own, each with the policy that applies.",
    ),
    Operation(
        "suspend-sending",
        m.SuspendSendingRequest,
        suspend_sending,
        summary="Stop a mailbox from sending (every submission gets a 5xx); it still receives mail and logs in.",
    ),
    Operation(
        "resume-sending",
        m.ResumeSendingRequest,
        resume_sending,
        summary="Let a suspended mailbox send again, with its counts started afresh.",
    ),
    Operation(
        "add-webhook",
        m.AddWebhookRequest,
        add_webhook,
        write=False,
        local=True,
        summary="Have events POSTed to a URL, signed (Standard Webhooks); the signing secret is answered once.",
    ),
    Operation(
        "list-webhooks",
        m.ListWebhooksRequest,
        list_webhooks,
        method="GET",
        write=False,
        inline=True,
        summary="List your webhooks and how their deliveries fare (never their secrets).",
    ),
    Operation(
        "remove-webhook",
        m.RemoveWebhookRequest,
        remove_webhook,
        write=False,
        local=True,
        summary="Remove a webhook; its pending deliveries are dropped.",
    ),
]

OPERATIONS: dict[str, Operation] = {
    op.name: op for op in _SPEC + _EXTRA + _ALIASES + _DNS + _ONBOARDING + _OWNERS + _CONTROLS + _FLEET
}
SPEC_OPERATIONS: tuple[str, ...] = tuple(op.name for op in _SPEC)
