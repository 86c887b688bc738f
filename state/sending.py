"""Outbound sending: a mailbox's sending state, what the nodes are told, what they report back.

The state holds what an admin decided and what a node decided on its own, per mailbox
(`Mailbox.sending`: suspended or not, why, and when that last changed), and the limits
(state.limits). The compiler writes, for the nodes' policy service (pi-pull/pipull/policy.py):

    rendered/sending                            node-wide defaults, from mailstate.yaml's `sending:`
        send_per_hour <n|none>
        send_per_day <n|none>
        auto_suspend_factor <x|none>
    rendered/domains/<bb>/<domain>/sending      only for a domain with something to say
        @limits <n|default> <n|default>         the domain's (else its project's) send_per_hour and send_per_day
        <local> <ok|suspended> <yyyymmddTHHMMSSZ>   each active mailbox with a sending state, sorted

A mailbox's token (`<ok|suspended> <stamp>`) changes with every suspend and resume: a node that
sees a new token starts counting the mailbox afresh and forgets a suspension of its own, so a
resumed mailbox can send at once. A node that suspends a mailbox by itself (past
`auto_suspend_factor` x a limit) says so in its report with the token it saw; the server then
commits the suspension (`auto_suspensions`), unless the token changed meanwhile (a resume).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mailstate.state import limits as lim
from mailstate.state.models import (
    SEND_LIMITS,
    USE_LIMITS,
    DomainFile,
    Limits,
    Mailbox,
    MailboxSending,
    ProjectFile,
    Settings,
)

SENDING_FRAGMENT = "sending"
SENDING_FILE = "rendered/sending"
LIMITS_KEY = "@limits"  # '@' never starts a local part, so the line cannot be a mailbox's
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
TOKEN_PATTERN = r"^(?:(?:ok|suspended) [0-9]{8}T[0-9]{6}Z)?$"
REPORT_EMAIL = r"^[a-z0-9][a-z0-9._+-]{0,63}@[a-z0-9][a-z0-9.-]{0,252}$"
MAX_SENDING_ENTRIES = 50_000
MAX_COUNT = 2**31
REPORT_FRESH = timedelta(days=1)  # older figures are no longer shown (a node that stopped reporting)


def token(state: MailboxSending | None) -> str:
    """The mailbox's sending token as the nodes see it ("" for a mailbox that never had a state)."""
    if state is None:
        return ""
    return f"{'suspended' if state.suspended else 'ok'} {state.changed_at.strftime(STAMP_FORMAT)}"


def next_change(current: MailboxSending | None, now: datetime) -> datetime:
    """When a change made `now` is stamped: never the same second as the last one, so its token differs."""
    if current is not None and now <= current.changed_at:
        return current.changed_at + timedelta(seconds=1)
    return now


def suspended(current: MailboxSending | None, reason: str, now: datetime) -> MailboxSending:
    """The state after suspend-sending: a mailbox already suspended keeps its stamp (the nodes keep
    their counts), and only its reason changes."""
    if current is not None and current.suspended:
        return current.model_copy(update={"reason": reason})
    return MailboxSending(suspended=True, reason=reason, changed_at=next_change(current, now))


def needs_resume(box: Mailbox, report: Mapping[str, Any] | None) -> bool:
    """resume-sending changes something: the state suspends the mailbox, or a node does by itself
    under the mailbox's current token (its report arrived before the server committed it)."""
    if box.sending is not None and box.sending.suspended:
        return True
    return bool(report and report.get("state") == "suspended" and report.get("token") == token(box.sending))


# --- what the compiler writes ----------------------------------------------------------------


def _number(value: float | int | None, none: str) -> str:
    if value is None:
        return none
    return f"{value:g}" if isinstance(value, float) else str(value)


def settings_text(settings: Settings) -> bytes | None:
    """`rendered/sending` (None: no `sending:` block, no file)."""
    block = settings.sending
    if block is None:
        return None
    return (
        f"send_per_hour {_number(block.send_per_hour, 'none')}\n"
        f"send_per_day {_number(block.send_per_day, 'none')}\n"
        f"auto_suspend_factor {_number(block.auto_suspend_factor, 'none')}\n"
    ).encode("ascii")


def domain_lines(dom: DomainFile, project: ProjectFile | None) -> list[str]:
    """The lines of a domain's `sending` fragment ([] : no fragment)."""
    hour, day = lim.domain_send_override(dom, project)
    lines = []
    if hour is not None or day is not None:
        lines.append(f"{LIMITS_KEY} {_number(hour, 'default')} {_number(day, 'default')}")
    for local, box in sorted(dom.mailboxes.items()):
        if box.active and box.sending is not None:
            lines.append(f"{local} {token(box.sending)}")
    return lines


# --- what the nodes report -------------------------------------------------------------------


class SendingEntry(BaseModel):
    """One login's figures in a node's report (pi-pull/pipull/policy.py), recipients and messages
    over the last hour and day. Strict, like the usage entries."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    login: str = Field(pattern=REPORT_EMAIL, max_length=320, description="The SASL login (the mailbox address).")
    state: Literal["ok", "limited", "suspended"] = Field(
        description="limited: the node refuses its submissions for a limit now; suspended: the node refuses them all."
    )
    token: str = Field(
        pattern=TOKEN_PATTERN, max_length=40, description="The mailbox's sending token the node counted under."
    )
    messages_hour: int = Field(ge=0, le=MAX_COUNT)
    recipients_hour: int = Field(ge=0, le=MAX_COUNT)
    messages_day: int = Field(ge=0, le=MAX_COUNT)
    recipients_day: int = Field(ge=0, le=MAX_COUNT)
    refused_hour: int = Field(ge=0, le=MAX_COUNT)


@dataclass(frozen=True)
class SendingChange:
    """A login whose reported state changed (state.localdb.LocalDB.record_sending)."""

    domain: str
    local: str
    before: str | None
    after: str
    token: str
    figures: Mapping[str, int]

    @property
    def email(self) -> str:
        return f"{self.local}@{self.domain}"


def report_rows(snapshot_domains: Mapping[str, DomainFile], entries: Iterable[SendingEntry]) -> list[tuple[Any, ...]]:
    """Entries that name an existing mailbox, as (domain, local, state, token, mh, rh, md, rd, refused) rows."""
    rows = []
    for e in entries:
        local, _, domain = e.login.partition("@")
        dom = snapshot_domains.get(domain)
        if dom is None or local not in dom.mailboxes:
            continue
        rows.append(
            (
                domain,
                local,
                e.state,
                e.token,
                e.messages_hour,
                e.recipients_hour,
                e.messages_day,
                e.recipients_day,
                e.refused_hour,
            )
        )
    return rows


def auto_suspensions(
    snapshot_domains: Mapping[str, DomainFile], changes: Iterable[SendingChange]
) -> list[tuple[str, str]]:
    """(email, reason) of every mailbox a node suspended by itself that the state does not suspend
    yet, under the token the state still has (so a report that crossed a resume is ignored)."""
    out = []
    for change in changes:
        if change.after != "suspended":
            continue
        dom = snapshot_domains.get(change.domain)
        box = dom.mailboxes.get(change.local) if dom is not None else None
        if box is None or (box.sending is not None and box.sending.suspended) or token(box.sending) != change.token:
            continue
        f = change.figures
        reason = (
            f"automatic: {f.get('recipients_hour', 0)} recipient(s) in the last hour and {f.get('recipients_day', 0)} "
            f"in the last day, {f.get('refused_hour', 0)} of them refused for a limit, passed auto_suspend_factor"
        )
        out.append((change.email, reason))
    return out


def _fresh(report: Mapping[str, Any] | None, now: datetime | None) -> bool:
    if not report:
        return False
    if now is None:
        return True
    try:
        at = datetime.fromisoformat(str(report["reported_at"]))
    except (KeyError, ValueError):
        return False
    return now - at <= REPORT_FRESH


def user_fields(box: Mailbox, report: Mapping[str, Any] | None, now: datetime | None = None) -> dict[str, Any]:
    """list-users' `sending`, `sending_reason` and `sent` for one mailbox."""
    fresh = _fresh(report, now)
    sent = None
    if fresh and report is not None:
        sent = {
            k: report[k] for k in ("messages_hour", "recipients_hour", "messages_day", "recipients_day", "refused_hour")
        }
        sent["reported_at"] = report["reported_at"]
    if box.sending is not None and box.sending.suspended:
        return {"sending": "suspended", "sending_reason": box.sending.reason, "sent": sent}
    state = "ok"
    if (
        fresh
        and report is not None
        and report.get("token") == token(box.sending)
        and report.get("state") in ("limited", "suspended")
    ):
        state = str(report["state"])
    reason = "a node suspended it by itself; the server records it" if state == "suspended" else None
    return {"sending": state, "sending_reason": reason, "sent": sent}


def _peak(doms: Iterable[DomainFile], sent: Mapping[str, Mapping[str, Mapping[str, Any]]], key: str) -> int | None:
    best: int | None = None
    for dom in doms:
        rows = sent.get(dom.domain, {})
        for local, box in dom.mailboxes.items():
            row = rows.get(local)
            if box.active and row is not None:
                best = max(best or 0, int(row[key]))
    return best


def limits_entry(
    settings: Settings,
    project_id: int | None,
    domain: str | None,
    limits: Limits | None,
    use: lim.Use,
    doms: list[DomainFile],
    sent: Mapping[str, Mapping[str, Mapping[str, Any]]],
    project: ProjectFile | None,
) -> dict[str, Any]:
    """One entry of list-limits: a project's (domain None) or a domain's limits with their use."""
    values = lim.limits_of(limits)
    entry: dict[str, Any] = {"project_id": project_id, "domain": domain}
    for name in USE_LIMITS:
        entry[name] = {"limit": values.get(name), "use": use.get(name)}
    if domain is not None and doms:
        found = lim.effective_send_limits(settings, doms[0], project)
        effective = {"send_per_hour": found.per_hour, "send_per_day": found.per_day}
    else:
        default = settings.sending
        effective = {
            name: values.get(name, getattr(default, name) if default is not None else None) for name in SEND_LIMITS
        }
    for name, key in (("send_per_hour", "recipients_hour"), ("send_per_day", "recipients_day")):
        entry[name] = {"limit": values.get(name), "use": _peak(doms, sent, key), "effective": effective[name]}
    return entry
