"""The audit log: commits and their trailers, read with `git log`, filtered."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mailstate.state import validate as v
from mailstate.state.gitrepo import git

_FIELD = "\x1f"
_RECORD = "\x1e"
_FORMAT = _FIELD.join(["%H", "%cI", "%s", "%(trailers:unfold,separator=%x1d)"]) + _RECORD


@dataclass(frozen=True)
class AuditEntry:
    commit: str
    date: str
    subject: str
    action: str
    target: str
    project: str
    actor: str
    request_id: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def touches_domain(self, domain: str) -> bool:
        return self.target == domain or self.target.endswith("@" + domain)


def read_log(repo: Path, rev: str = "main") -> list[AuditEntry]:
    """Every commit reachable from `rev`, newest first, with its trailers parsed."""
    out = git("-C", str(repo), "log", f"--format={_FORMAT}", rev).stdout
    entries = []
    for record in out.split(_RECORD):
        record = record.strip("\n")
        if not record:
            continue
        sha, date, subject, trailers = (record.split(_FIELD) + [""] * 4)[:4]
        fields: dict[str, str] = {}
        for line in trailers.split("\x1d"):
            key, sep, value = line.partition(":")
            if sep:
                fields.setdefault(key.strip().lower(), value.strip())
        action = fields.get("action", "")
        target = subject[len(action) + 1 :] if action and subject.startswith(action + " ") else ""
        entries.append(
            AuditEntry(
                commit=sha,
                date=date,
                subject=subject,
                action=action or "-",
                target=target,
                project=fields.get("project", "-"),
                actor=fields.get("actor", "-"),
                request_id=fields.get("request-id", "-"),
            )
        )
    return entries


def filter_log(
    entries: list[AuditEntry],
    *,
    domain: str | None = None,
    mailbox: str | None = None,
    project: str | None = None,
    action: str | None = None,
) -> list[AuditEntry]:
    """Entries matching every filter given (None: any)."""
    # The operations' own normalisers: a filter matches what a write with the same text would
    # touch (IDN as punycode), and a look-alike is refused instead of folded into another address.
    domain = v.normalize_domain(domain, field="domain") if domain else None
    mailbox = "@".join(v.normalize_email(mailbox, field="mailbox")) if mailbox else None
    result = []
    for e in entries:
        if domain and not e.touches_domain(domain):
            continue
        if mailbox and e.target != mailbox:
            continue
        if project and e.project != str(project):
            continue
        if action and e.action != action:
            continue
        result.append(e)
    return result
