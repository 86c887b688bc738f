"""The state format upgrade: format 1 (no mailbox ids) → format 2, in exactly one signed commit.

Format 2 gives every mailbox an immutable id, which the compiled homes carry
(`<mail_root>/<domain>/<local>~<id>`), so that an address re-created after a hard delete never
meets the old owner's Maildir. The upgrade commit:

* sets `format: 2` in mailstate.yaml (with `purge_after_days`, default 7),
* gives every mailbox (active or soft-deleted) an id `<yyyymmdd>-<6 hex>`: the day of the
  upgrade (the creation day is not known) and 24 bits derived from a random seed drawn once
  per upgrade (so the ids are random, and unique within a domain),
* re-renders every email-enabled domain (new homes, the new `mailboxes` fragment) and writes
  `rendered/settings`.

Passwords, quotas and active flags are untouched, so every login keeps working. The nodes
move each Maildir from `<local>` to `<local>~<id>` when they apply the commit (rename plus a
symlink while the old config is still live; docs/node-guide.md, "Mailbox lifecycle").

The upgrade runs through the store's normal write path, so it is signed by the server's key,
compare-and-swapped against other writers and, in upstream mode, pushed before it counts.
It is idempotent: a format-2 state makes no commit. `open_store` runs it (the server on start,
any CLI command); `mailstate upgrade --data DIR` runs it on purpose and says what it did.

Format 2 also renders a `sender_login_maps` fragment per domain (compiler/maplines.py). A format-2
state committed without those fragments gets them in one signed commit too (the same
operation: the domain files stay as they are, every email-enabled domain is rendered again).
Whether that is due is read from one domain, the first (by name) that must have a fragment:
every commit since renders it, and the upgrade renders all at once.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from typing import Any

from mailstate.compiler.maplines import sender_lines
from mailstate.compiler.render import domain_dir
from mailstate.state import models as m
from mailstate.state import senders
from mailstate.state.errors import Unavailable, UpstreamUnavailable
from mailstate.state.ops import Context, Operation, Prepared, new_mailbox_id
from mailstate.state.snapshot import Actor, Change, Outcome
from mailstate.state.store import Store

log = logging.getLogger("mailstate.upgrade")
TARGET_FORMAT = m.FORMAT_VERSION
ACTOR = Actor.admin("mailstate-upgrade")


def _prepare(req: Any, settings: m.Settings) -> Prepared:
    return {"seed": secrets.token_hex(16)}


def _random_hex(seed: str, domain: str, local: str, attempt: int) -> str:
    return hashlib.sha256(f"{seed}\0{domain}\0{local}\0{attempt}".encode()).hexdigest()[:6]


def with_ids(dom: m.DomainFile, seed: str, now: Any) -> m.DomainFile:
    """`dom` with an id on every mailbox that has none (ids stay unique within the domain)."""
    taken = {box.id for box in dom.mailboxes.values() if box.id is not None}
    boxes: dict[str, m.Mailbox] = {}
    for local, box in sorted(dom.mailboxes.items()):
        if box.id is None:
            attempt = 0
            new_id = new_mailbox_id(now, _random_hex(seed, dom.domain, local, attempt))
            while new_id in taken:
                attempt += 1
                new_id = new_mailbox_id(now, _random_hex(seed, dom.domain, local, attempt))
            taken.add(new_id)
            box = box.model_copy(update={"id": new_id})
        boxes[local] = box
    return dom.model_copy(update={"mailboxes": boxes})


def senders_missing(store: Store) -> bool:
    """Whether a format-2 state predates the sender_login_maps fragments (see the module docstring)."""
    snap = store.snapshot
    if snap.settings.format < 2 or snap.commit is None:
        return False
    # Any one domain with sender lines tells (a state is upgraded in one commit): no sort of
    # 200k names, and a start parses the first such domain only (state.domainmap).
    for name in snap.domains:
        dom = snap.domains[name]
        if dom.email_enabled and sender_lines(dom):
            return store.git.read(snap.commit, f"{domain_dir(name)}/{senders.SENDER_FRAGMENT}") is None
    return False


def upgrade_change(ctx: Context, seed: str, *, render_senders: bool = False) -> Change | None:
    """The change that turns the state of `ctx` into format 2, or None when it already is.
    With ``render_senders``, a format-2 state is rendered again (its sender_login_maps)."""
    state = ctx.state
    if state.settings.format >= TARGET_FORMAT:
        if not render_senders:
            return None
        return Change(domains={name: dom for name, dom in state.domains.items() if dom.email_enabled})
    change = Change(settings=state.settings.model_copy(update={"format": TARGET_FORMAT}))
    for name, dom in state.domains.items():
        # Enabled domains re-render (new homes, the mailboxes fragment) even without mailboxes;
        # a disabled domain's file changes only if it holds mailboxes.
        if dom.mailboxes or dom.email_enabled:
            change.domains[name] = with_ids(dom, seed, ctx.now)
    return change


def _apply(ctx: Context, req: m.EmptyRequest, prep: Prepared) -> Outcome:
    before = ctx.state.settings.format
    render_senders = bool(prep.get("senders"))
    change = upgrade_change(ctx, str(prep.get("seed") or secrets.token_hex(16)), render_senders=render_senders)
    if change is None:
        return Outcome({"upgraded": False, "format": before})
    if before >= TARGET_FORMAT:
        return Outcome(
            {"upgraded": True, "from_format": before, "format": before, "sender_maps": True, "mailboxes": 0},
            change=change,
            target="sender_login_maps",
        )
    mailboxes = sum(len(dom.mailboxes) for dom in ctx.state.domains.values())
    result = {"upgraded": True, "from_format": before, "format": TARGET_FORMAT, "mailboxes": mailboxes}
    return Outcome(result, change=change, target=f"format {TARGET_FORMAT}")


UPGRADE = Operation(
    "upgrade",
    m.EmptyRequest,
    _apply,
    admin=True,
    in_spec=False,
    prepare=_prepare,
    summary="Upgrade the state to the current format in one signed commit (not an API route).",
)


def upgrade_store(store: Store, *, strict: bool = True) -> dict[str, Any]:
    """Upgrade the store's state if it is older than the current format.

    Returns the operation's result: `{"upgraded": False, "format": 2, "commit": None}` when
    there was nothing to do, else `{"upgraded": True, "from_format": 1, "format": 2,
    "mailboxes": N, "commit": sha}`. With `strict=False` (a server starting) an upgrade that
    cannot be committed now (upstream unreachable, other writers) is logged and skipped: the
    store goes on serving the format-1 state, and the next start tries again."""
    render_senders = senders_missing(store)
    if store.snapshot.settings.format >= TARGET_FORMAT and not render_senders:
        return {"upgraded": False, "format": store.snapshot.settings.format, "commit": None}
    try:
        outcome = store.execute_operation(
            UPGRADE, ACTOR, m.EmptyRequest(), {**_prepare(None, store.snapshot.settings), "senders": render_senders}
        )
    except (Unavailable, UpstreamUnavailable) as exc:
        if strict:
            raise
        log.warning("state format upgrade postponed: %s", exc.message)
        return {"upgraded": False, "format": store.snapshot.settings.format, "commit": None, "postponed": exc.message}
    if outcome.result.get("sender_maps"):
        log.info("rendered the sender_login_maps fragments in commit %s", outcome.result.get("commit"))
    else:
        log.info("upgraded the state to format %s in commit %s", TARGET_FORMAT, outcome.result.get("commit"))
    return outcome.result
